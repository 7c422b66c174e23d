"""A learner rank's checkpoint: ``LearnerRank.save`` / ``.load`` (actors/learner.py) are these two functions.

Every rank writes (DeepSpeed) its model, optimizer and scheduler partitions and its RNG state; rank 0 also the gap
probe's frozen previous-version weights. A disk fault on any rank is agreed on by every rank with one all-reduce,
so the collectives still match and the coordinator drops that checkpoint and trains on (docs/guides/reliability.md,
"Disk faults"). ``learner`` is the ``LearnerRank``.

Elastic resize (``resume_tag``): ZeRO partitions Adam's moments and the fp32 master weights over the ranks that
saved them, and DeepSpeed refuses to load them into a group of another size. So when the group that resumes is not
the size of the one that saved, rank 0 first converts the checkpoint to DeepSpeed's Universal Checkpoint (the
``deepspeed.checkpoint.ds_to_universal`` tool: every parameter's fp32 weight, exp_avg, exp_avg_sq and step as one
whole tensor, in ``<checkpoint>/state_universal``), and every rank loads that with ``checkpoint.load_universal``,
which re-partitions it over the new group: the moments survive a resize from R to R' ranks either way. ZeRO stage 0
needs none of this: its optimizer state (fp32, or bf16's fp32 masters) is saved whole. Only if the conversion fails
are the moments reset, logged as ``learner.optimizer_reset`` with the tool's error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import structlog
import torch
import torch.distributed as dist

from engine.modeling.model import disk_error, load_weights, save_weights

log = structlog.get_logger()

TAG, UNIVERSAL_TAG = "state", "state_universal"  # the DeepSpeed tag folders inside a learner checkpoint
_PARTITION = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def saved_world(path: str) -> int:
    """The data-parallel size of the group that saved ``path``: its number of ZeRO optimizer partitions (0: the
    optimizer state is not partitioned, ZeRO stage 0)."""
    folder = Path(path) / TAG
    ranks = {m.group(2) for f in (folder.iterdir() if folder.is_dir() else ()) if (m := _PARTITION.fullmatch(f.name))}
    return len(ranks)


def resume_tag(path: str, *, rank: int, world: int, group) -> str:
    """Every rank, before ``deepspeed.initialize``: the tag to resume ``path`` from. ``TAG`` when this group has
    the size of the one that saved it; otherwise ``UNIVERSAL_TAG``, once rank 0 has converted it (module docstring;
    a conversion made by an earlier restart is reused), or ``TAG`` if the conversion failed (the moments reset)."""
    saved = saved_world(path)
    if saved in (0, world):
        return TAG
    ok = torch.tensor([1], dtype=torch.int64)
    if rank == 0:
        error = _convert_to_universal(Path(path))
        if error:
            log.warning("learner.optimizer_reset", checkpoint=path, saved_world=saved, world=world,
                        reason=f"Universal Checkpoint conversion failed: {error}")
        ok[0] = 0 if error else 1
    dist.broadcast(ok, src=0, group=group)  # also what ranks > 0 wait on while rank 0 converts
    if not int(ok):
        return TAG
    log.info("learner.resize", checkpoint=path, saved_world=saved, world=world, tag=UNIVERSAL_TAG)
    return UNIVERSAL_TAG


def _convert_to_universal(path: Path) -> str:
    """``ds_to_universal`` of ``path/state`` into ``path/state_universal`` (in a temporary folder renamed when
    complete) -> "" or the tool's last output lines. Runs as its own process, as DeepSpeed ships the tool."""
    out = path / UNIVERSAL_TAG
    if (out / "zero" / "optimizer_state.pt").exists():
        return ""
    tmp = path / f".{UNIVERSAL_TAG}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = max(1, min(4, (os.cpu_count() or 1) // 2))  # the tool's parallel extract/merge processes
    argv = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / TAG),
            "--output_folder", str(tmp), "--num_extract_workers", str(workers),
            "--num_merge_workers", str(max(1, workers // 2)),
            "--inject_missing_state"]  # checkpoints carry no universal_checkpoint_info of their own
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    os.replace(tmp, out)
    (path / "latest_universal").write_text(UNIVERSAL_TAG)  # the tool wrote the temporary folder's name there
    return ""


def save_rank(learner, path: str) -> str:
    """Every rank: model, optimizer and scheduler (DeepSpeed), this rank's RNG, and (rank 0) the frozen
    previous-version weights of the gap probe. Collective: all ranks call it with the same path.

    Returns "" once every rank's files are written. A disk fault on any rank (ENOSPC, EIO, EFBIG, EROFS: the
    rank logs ``checkpoint.write_failed`` with the path and the cause) makes every rank return the cause
    instead: the ranks agree, rank 0 answers ``CheckpointSaved(path="")``, and the coordinator drops the
    staging folder and trains on (engine/coordinator/loop.py ``_checkpoint``). Any other error propagates."""
    fault = _disk_fault(lambda: Path(path).mkdir(parents=True, exist_ok=True), path)
    if _all_ranks_ok(fault is None, learner.cpu_group):
        try:
            learner.engine.save_checkpoint(path, tag="state", client_state={"version": learner.version})
        except (OSError, RuntimeError) as e:
            if (fault := disk_error(e, path)) is None:
                raise
            # DeepSpeed writes after its tag check and ends with one barrier, which this rank skipped: join it
            dist.barrier()
        if fault is None:
            fault = _disk_fault(lambda: torch.save(_rng_state(), Path(path) / f"rng_rank{learner.rank}.pt"), path)
        if fault is None and learner.rank == 0 and learner.probe_model is not None:
            fault = _disk_fault(lambda: save_weights(learner.probe_model, Path(path) / "probe.safetensors"), path)
    if fault is not None:
        log.error("checkpoint.write_failed", path=fault.filename or path, error=fault.strerror,
                  errno=fault.errno, rank=learner.rank, detail="this checkpoint is dropped; the previous one "
                  "is kept and the next one is tried at the next train.checkpoint_every step")
    if _all_ranks_ok(fault is None, learner.cpu_group):  # also the barrier every rank's files are written by
        return ""
    return f"{fault.filename}: {fault.strerror}" if fault is not None else "another learner rank could not " \
        "write its files (its log names the cause)"

def _all_ranks_ok(ok: bool, group) -> bool:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # a host tensor: the gloo group
    return int(flag) == 0


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rank(learner, path: str, tag: str = TAG) -> None:
    """Every rank: continue from ``save(path)``; ``tag`` from ``resume_tag``, which the engine was built for
    (``UNIVERSAL_TAG``: DeepSpeed's ``load_universal``, the elastic resize that keeps Adam's moments). A
    mismatch the conversion could not bridge loads the model, version and schedule with fresh moments
    (``learner.optimizer_reset`` in the log)."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    try:
        _, client = learner.engine.load_checkpoint(path, tag=tag)
    except ZeRORuntimeException as e:
        if "world size" not in str(e):
            raise
        log.warning("learner.optimizer_reset", checkpoint=path, world=learner.world, reason=str(e).split(".")[0])
        _, client = learner.engine.load_checkpoint(path, tag=tag, load_optimizer_states=False)
    if client is None:
        raise FileNotFoundError(f"no learner checkpoint in {path} (tag {tag!r})")
    learner.version = int(client["version"])
    learner._hf_state = learner._gather_hf_state()
    rng_file = Path(path) / f"rng_rank{learner.rank}.pt"
    if rng_file.exists():  # a rank the saving group did not have keeps its fresh generator
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    probe = Path(path) / "probe.safetensors"
    if learner.probe_model is not None:
        if probe.exists():
            load_weights(learner.probe_model, probe)
        else:
            learner.probe_model.load_state_dict(learner.hf_state())


def _disk_fault(write, path: str) -> OSError | None:
    """None once ``write()`` returns; its disk fault as an OSError naming the file (``disk_error``); any other
    error propagates."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        if (fault := disk_error(e, path)) is None:
            raise
        return fault
    return None
