"""Checkpoints of the whole asynchronous state, and finding the newest complete one.

``runs/<name>/checkpoints/step_000050/`` holds:
- ``learner/``: every rank's model, optimizer and RNG (DeepSpeed ``save_checkpoint``, written by the learner);
- ``policy.safetensors``: the weights the rollout workers hold at that step (version = step);
- ``coordinator.json`` + ``arrays.npz``: buffered groups, in-flight groups with their partial responses (tokens,
  behaviour log-probs, per-token versions, routes, finish reasons, rewards), the prompt-stream frontier, the
  counters and per-prompt statistics;
- ``meta.json``, written last: a checkpoint without it is incomplete (a crash while saving) and is skipped.
``checkpoints/latest`` names the newest complete one (replaced atomically). The two newest are kept.

Arrays are stored with ``np.savez`` and read with ``allow_pickle=False``; nothing here is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.buffer import Group, Sample

_KEEP = 2


@dataclass
class Checkpoint:
    path: Path
    step: int
    meta: dict

    @property
    def learner_dir(self) -> Path:
        return self.path / "learner"

    @property
    def policy_path(self) -> Path:
        return self.path / "policy.safetensors"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_coordinator(path: Path, *, step: int, version: int, rollouts_state: dict, extra: dict,
                     policy_file: str) -> None:
    """Write the coordinator's part into ``path`` (the learner has written ``path/learner`` already), then
    ``meta.json``, then move ``latest``; drop checkpoints older than the newest two."""
    arrays: dict[str, np.ndarray] = {}
    groups = {kind: [_group_meta(g, f"{kind}{i}", arrays) for i, g in enumerate(rollouts_state[kind])]
              for kind in ("inflight", "buffer")}
    state = {"counts": rollouts_state["counts"], "sent_version": rollouts_state["sent_version"], **groups,
             **extra}
    np.savez(path / "arrays.npz", **arrays)
    _atomic_write(path / "coordinator.json", json.dumps(state))
    shutil.copyfile(policy_file, path / "policy.safetensors")
    _atomic_write(path / "meta.json", json.dumps({"step": step, "version": version}))
    root = path.parent
    _atomic_write(root / "latest", path.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run (None if there is none)."""
    root = run_dir / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if (p / "meta.json").exists()), reverse=True)
    for p in candidates:
        try:
            meta = json.loads((p / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return Checkpoint(path=p, step=int(meta["step"]), meta=meta)
    return None


def load_coordinator(ckpt: Checkpoint) -> dict:
    """The state ``save_coordinator`` wrote, with groups rebuilt (``inflight`` and ``buffer`` lists)."""
    state = json.loads((ckpt.path / "coordinator.json").read_text())
    with np.load(ckpt.path / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for kind in ("inflight", "buffer"):
        state[kind] = [_group_from(meta, arrays) for meta in state[kind]]
    return state


def _group_meta(g: Group, key: str, arrays: dict[str, np.ndarray]) -> dict:
    arrays[f"{key}.prompt_ids"] = np.asarray(g.prompt_ids)
    if g.prompt_routes is not None:
        arrays[f"{key}.prompt_routes"] = np.asarray(g.prompt_routes)
    samples = []
    for s in g.ordered():
        sk = f"{key}.{s.sample_index}"
        arrays[f"{sk}.tokens"], arrays[f"{sk}.logprobs"] = s.token_ids, s.behavior_logprobs
        arrays[f"{sk}.versions"] = s.token_versions
        if s.routes is not None:
            arrays[f"{sk}.routes"] = s.routes
        samples.append({"index": s.sample_index, "finish_reason": s.finish_reason, "reward": s.reward,
                        "valid": s.valid, "reward_parts": s.reward_parts})
    return {"key": key, "group_id": g.group_id, "prompt_id": g.prompt_id, "answer": g.answer,
            "num_samples": g.num_samples, "temperature": g.temperature, "source": g.source,
            "initial_samples": g.initial_samples, "samples": samples}


def _group_from(meta: dict, arrays: dict[str, np.ndarray]) -> Group:
    key = meta["key"]
    g = Group(group_id=meta["group_id"], prompt_id=meta["prompt_id"], prompt_ids=arrays[f"{key}.prompt_ids"],
              answer=meta["answer"], num_samples=meta["num_samples"], temperature=meta["temperature"],
              prompt_routes=arrays.get(f"{key}.prompt_routes"), source=meta["source"],
              initial_samples=meta["initial_samples"])
    for sm in meta["samples"]:
        sk = f"{key}.{sm['index']}"
        g.samples[sm["index"]] = Sample(
            sample_index=sm["index"], token_ids=arrays[f"{sk}.tokens"], behavior_logprobs=arrays[f"{sk}.logprobs"],
            token_versions=arrays[f"{sk}.versions"], routes=arrays.get(f"{sk}.routes"),
            finish_reason=sm["finish_reason"], reward=sm["reward"], valid=sm["valid"],
            reward_parts=sm["reward_parts"], _length=len(arrays[f"{sk}.tokens"]),
            _unrouted=f"{sk}.routes" not in arrays and len(arrays[f"{sk}.tokens"]) > 0)
    return g
