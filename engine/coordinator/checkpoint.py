"""Checkpoints of the whole asynchronous state, and finding the newest complete one.

``runs/<name>/checkpoints/step_000050/`` holds:
- ``learner/``: every rank's model, optimizer and RNG (DeepSpeed ``save_checkpoint``, written by the learner);
- ``policy.safetensors``: the weights the rollout workers hold at that step (version = step);
- ``coordinator.json`` + ``arrays.npz``: buffered groups, in-flight groups with their partial responses (tokens,
  behaviour log-probs, per-token versions, routes, finish reasons, rewards), the prompt-stream frontier, the
  counters and the staleness totals;
- ``meta.json``, written last, with the size and sha256 of every other file (the manifest).
Writes are atomic: everything goes into ``checkpoints/.staging_step_000050/``, every file and folder is fsynced,
and only then is the folder renamed to ``step_000050`` (a crash while saving leaves a staging folder, never a
half checkpoint; a disk fault while saving removes the staging folder and raises an OSError naming the path:
the previous checkpoint stays the newest). ``latest()`` verifies the manifest and skips a torn or corrupt
checkpoint with a logged error naming the bad file, so the previous one is used. ``checkpoints/latest`` names the newest complete one
(replaced atomically). The two newest are kept.

Arrays are stored with ``np.savez`` and read with ``allow_pickle=False``; nothing here is ever unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from engine.coordinator.buffer import Group, Sample

_KEEP = 2
_STAGING = ".staging_"

log = structlog.get_logger()


class CheckpointCorrupt(RuntimeError):
    """A checkpoint's files do not match its manifest (torn write, disk fault, edited by hand)."""


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

    @property
    def policy_digest(self) -> str:
        """``sha256:<hex>`` of the policy file from the manifest (what LoadWeights carries), "" for a checkpoint
        written before manifests existed."""
        entry = self.meta.get("files", {}).get(self.policy_path.name)
        return f"sha256:{entry[1]}" if entry else ""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before ``save_coordinator`` renames it into place."""
    path = run_dir / "checkpoints" / f"{_STAGING}step_{step:06d}"
    shutil.rmtree(path, ignore_errors=True)  # left by a crash while saving
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk keeps no torn temporary file; ``path`` is as it was
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(root: Path) -> dict[str, list]:
    """relative path -> [size, sha256] of every file under ``root``; fsyncs each file and folder on the way."""
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            _fsync_dir(p)
            continue
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
            os.fsync(f.fileno())
        files[str(p.relative_to(root))] = [p.stat().st_size, h.hexdigest()]
    _fsync_dir(root)
    return files


def verify(path: Path) -> dict:
    """``meta.json`` of the checkpoint at ``path`` once every file matches its manifest; else CheckpointCorrupt
    naming the first bad file. (Checkpoints written before manifests existed are accepted as they are.)"""
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{path}/meta.json is unreadable: {type(e).__name__}: {e}") from None
    for rel, (size, digest) in meta.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise CheckpointCorrupt(f"{f} is missing")
        if f.stat().st_size != size:
            raise CheckpointCorrupt(f"{f} has {f.stat().st_size} bytes, the manifest says {size} (torn write)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            raise CheckpointCorrupt(f"{f} does not match its sha256 in meta.json (corrupt)")
    return meta


def save_coordinator(path: Path, *, step: int, version: int, rollouts_state: dict, extra: dict,
                     policy_file: str) -> None:
    """Write the coordinator's part into the staging folder ``path`` (the learner has written ``path/learner``
    already), fsync everything, write ``meta.json`` with the manifest, rename the folder to ``step_{step}``,
    then move ``latest``; drop checkpoints older than the newest two.

    A disk fault before the rename (ENOSPC, EIO, EFBIG, EROFS) removes the staging folder and raises an OSError
    naming the file or folder and the cause: the previous checkpoints are untouched, ``latest()`` still finds the
    newest of them. After the rename the checkpoint is complete; a failure to move ``latest`` or to drop old
    checkpoints is only logged (``latest()`` finds checkpoints by their folders, not by that file)."""
    arrays: dict[str, np.ndarray] = {}
    groups = {kind: [_group_meta(g, f"{kind}{i}", arrays) for i, g in enumerate(rollouts_state[kind])]
              for kind in ("inflight", "buffer")}
    state = {"counts": rollouts_state["counts"], "sent_version": rollouts_state["sent_version"], **groups,
             **extra}
    root, final = path.parent, checkpoint_dir(path.parent.parent, step)
    try:
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "arrays.npz", **arrays)
        (path / "coordinator.json").write_text(json.dumps(state))
        shutil.copyfile(policy_file, path / "policy.safetensors")
        meta = {"step": step, "version": version, "files": _manifest(path)}
        _atomic_write(path / "meta.json", json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)  # one found corrupt and skipped at resume
        os.replace(path, final)
    except OSError as e:
        discard_staging(path)  # the file written names the fault (copyfile: filename2, its destination)
        raise OSError(e.errno, e.strerror, str(e.filename2 or e.filename or path)) from e
    try:
        _fsync_dir(root)
        _atomic_write(root / "latest", final.name)
    except OSError as e:
        log.warning("checkpoint.latest_not_updated", path=str(root / "latest"), error=e.strerror,
                    detail=f"{final.name} is complete and is found without it")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def learner_fault(path: Path, logs: Path) -> OSError:
    """What the coordinator knows when the learner answers ``CheckpointSaved(path="")`` (its ranks could not
    write their files under ``path``; each rank's log has ``checkpoint.write_failed`` with the cause): ENOSPC
    when that disk is full now, else the pointer to those logs."""
    try:
        full = shutil.disk_usage(_existing(path)).free < _FULL_BYTES
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"a learner rank could not write its files (its checkpoint.write_failed in {logs} "
                   "names the cause)", str(path))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


_FULL_BYTES = 1 << 20  # less free than this: the disk is full for naming the cause


def discard_staging(path: Path) -> None:
    """Remove a staging folder whose save failed (a disk fault): it never becomes a checkpoint."""
    shutil.rmtree(path, ignore_errors=True)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint whose files match its manifest (None if there is none). A torn or corrupt
    one is skipped with a logged error, and the one before it is used."""
    root = run_dir / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    for p in candidates:
        try:
            meta = verify(p)
        except CheckpointCorrupt as e:
            log.error("checkpoint.corrupt", checkpoint=p.name, error=str(e),
                      detail="skipped; falling back to the previous checkpoint")
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
