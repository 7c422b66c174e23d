"""A learner that dies mid-run: roll the whole run back to its newest checkpoint and continue, without a human.

Why the whole run and not only the learner: the learner's weights and optimizer moved on with every step after
the checkpoint, and the batches of those steps are gone with it. Restarting only the learner from the checkpoint
would train on a coordinator state (buffer, in-flight responses, prompt frontier, ledger) that no longer matches
its weights: prompts would be trained twice or never. So recovery does what ``resume=true`` does, in the same
process: every actor is stopped, ``metrics.jsonl`` and ``prompts.jsonl`` are trimmed to the checkpoint's step,
the learner group (torchrun and all its ranks) starts again from the checkpoint's model, optimizer and RNG, and
the coordinator restores the checkpoint's buffer, partial responses, counters and prompt-stream frontier. The
steps after the checkpoint are trained again, on the same prompts; the ledger holds each prompt exactly once.
Without a checkpoint yet, the run starts RL again from step 1.

What counts as a learner failure (``LearnerFailed``, raised by engine/coordinator/cluster.py): torchrun exiting (a rank
killed by any signal makes torchrun stop the group), or rank 0 silent for ``transport.peer_timeout_s``. An
``ErrorReport`` (a Python exception in the learner: a bug or a bad config) is not retried: it would fail again.
At most ``transport.max_learner_restarts`` restarts per run; one more failure stops the run with the reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from configs.schema import RunConfig
from engine.coordinator import checkpoint
from engine.coordinator.cluster import ActorFailed, Faults, LearnerFailed

log = structlog.get_logger()

Attempt = Callable[[checkpoint.Checkpoint | None, Faults], Awaitable[dict]]


async def restart_on_learner_failure(cfg: RunConfig, run_dir: Path, ckpt: checkpoint.Checkpoint | None,
                                     attempt: Attempt) -> dict:
    """``attempt(ckpt, faults)`` (the RL stage), and after each learner failure the same again from the
    newest checkpoint. Returns its summary plus the failures survived (``Faults``)."""
    faults = Faults()
    while True:
        try:
            summary = await attempt(ckpt, faults)
            return {**summary, "learner_restarts": faults.learner_restarts, "actor_restarts": faults.actor_restarts,
                    "frames_rejected": faults.frames_rejected}
        except LearnerFailed as failure:  # start_actors raises one exception, never a group
            faults.learner_restarts += 1
            restarts, limit = faults.learner_restarts, cfg.transport.max_learner_restarts
            if restarts > limit:
                raise ActorFailed(f"the learner failed {restarts} times, more than transport.max_learner_restarts="
                                  f"{limit} allows; giving up. Last failure: {failure}") from failure
            ckpt = checkpoint.latest(run_dir)
            log.warning("recovery.learner_restart", restart=restarts, of=limit, why=str(failure).split("\n")[0],
                        from_step=ckpt.step if ckpt else 0,
                        detail="every actor restarts; the run continues from this checkpoint's step")
