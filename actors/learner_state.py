"""A learner rank's checkpoint: ``LearnerRank.save`` / ``.load`` (actors/learner.py) are these two functions.

Every rank writes (DeepSpeed) its model, optimizer and scheduler partitions and its RNG state; rank 0 also the gap
probe's frozen previous-version weights. A disk fault on any rank is agreed on by every rank with one all-reduce,
so the collectives still match and the coordinator drops that checkpoint and trains on (docs/guides/reliability.md,
"Disk faults"). ``learner`` is the ``LearnerRank``.
"""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
import torch.distributed as dist

from engine.modeling.model import disk_error, load_weights, save_weights

log = structlog.get_logger()


def save_rank(learner, path: str) -> str:
    """Every rank: model, optimizer and scheduler (DeepSpeed), this rank's RNG, and (rank 0) the frozen
    previous-version weights of the gap probe. Collective: all ranks call it with the same path.

    Returns "" once every rank's files are written. A disk fault on any rank (ENOSPC, EIO, EFBIG, EROFS: the
    rank logs ``checkpoint.write_failed`` with the path and the cause) makes every rank return the cause
    instead: the ranks agree, rank 0 answers ``CheckpointSaved(path="")``, and the coordinator drops the
    staging folder and trains on (engine/coordinator/loop.py ``_checkpoint``). Any other error propagates."""
    fault = _disk_fault(lambda: Path(path).mkdir(parents=True, exist_ok=True), path)
    if _all_ranks_ok(fault is None):
        try:
            learner.engine.save_checkpoint(path, tag="state", client_state={"version": learner.version})
        except (OSError, RuntimeError) as e:
            if (fault := disk_error(e, path)) is None:
                raise
            # DeepSpeed writes after its tag check and ends with one barrier, which this rank skipped: join it
            dist.barrier()
        if fault is None:
            fault = _disk_fault(lambda: torch.save({"torch": torch.get_rng_state()},
                                                   Path(path) / f"rng_rank{learner.rank}.pt"), path)
        if fault is None and learner.rank == 0 and learner.probe_model is not None:
            fault = _disk_fault(lambda: save_weights(learner.probe_model, Path(path) / "probe.safetensors"), path)
    if fault is not None:
        log.error("checkpoint.write_failed", path=fault.filename or path, error=fault.strerror,
                  errno=fault.errno, rank=learner.rank, detail="this checkpoint is dropped; the previous one "
                  "is kept and the next one is tried at the next train.checkpoint_every step")
    if _all_ranks_ok(fault is None):  # also the barrier every rank's files are written by
        return ""
    return f"{fault.filename}: {fault.strerror}" if fault is not None else "another learner rank could not " \
        "write its files (its log names the cause)"

def _all_ranks_ok(ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) == 0

def load_rank(learner, path: str) -> None:
    """Every rank: continue from ``save(path)``. An elastic group of another size than the one that saved
    it loads the model, version and schedule, but not ZeRO's optimizer partitions (DeepSpeed cannot re-shard
    them): Adam's moments restart from zero, said in the log as ``learner.optimizer_reset``."""
    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    try:
        _, client = learner.engine.load_checkpoint(path, tag="state")
    except ZeRORuntimeException as e:
        if "world size" not in str(e):
            raise
        log.warning("learner.optimizer_reset", checkpoint=path, world=learner.world, reason=str(e).split(".")[0])
        _, client = learner.engine.load_checkpoint(path, tag="state", load_optimizer_states=False)
    if client is None:
        raise FileNotFoundError(f"no learner checkpoint in {path} (tag 'state')")
    learner.version = int(client["version"])
    learner._hf_state = learner._gather_hf_state()
    rng_file = Path(path) / f"rng_rank{learner.rank}.pt"
    if rng_file.exists():  # a rank the saving group did not have keeps its fresh generator
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
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
