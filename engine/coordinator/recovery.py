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

A signal (``Interrupts``): Ctrl-C (SIGINT) or SIGTERM (what a cluster scheduler sends before it kills a job) asks
the RL loop to checkpoint the last completed step, the same checkpoint ``train.checkpoint_every`` writes, within
``train.interrupt_checkpoint_s``; then every actor stops and the process exits 130 or 143. A step the learner is
in finishes first; the wait for the next batch, or an eval, is abandoned. A second signal, or the time running
out, abandons the save at once: the checkpoint being written stays a staging folder, the previous one is intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
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


SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SaveAborted(BaseException):
    """A second signal arrived while the interrupt's checkpoint was being written: abandon it (not an Exception,
    so that nothing on the way out mistakes it for a failure to handle)."""


class Interrupts:
    """SIGINT and SIGTERM while the run is in ``install()``..``uninstall()``. The first signal sets ``requested``
    when ``saving`` is on (the RL loop can checkpoint: actors up, a step to save) and ``budget_s`` > 0, and the
    loop checkpoints and stops; otherwise, and on a second signal, or ``budget_s`` after the first, the run's task
    is cancelled at once. Signals after the save (or the cancel) only log: the actors are being stopped."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.signum: int | None = None  # the first signal
        self.requested = asyncio.Event()
        self.saving = False
        self.aborted: str | None = None  # why the save was abandoned (or never tried)
        self._done = False
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> None:
        loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)

    def saved(self) -> None:
        """The interrupt's checkpoint is written (or there was nothing to write): later signals change nothing."""
        self._done = True
        if self._timer is not None:
            self._timer.cancel()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            if self.saving and self.budget_s > 0:
                log.warning("run.interrupt_requested", signal=name,
                            detail=f"checkpointing the last completed step (train.interrupt_checkpoint_s="
                                   f"{self.budget_s:g}); send it again to stop at once without saving")
                self.requested.set()
                self._timer = asyncio.get_running_loop().call_later(
                    self.budget_s, self._abort, f"train.interrupt_checkpoint_s={self.budget_s:g} ran out")
            else:
                self._abort("train.interrupt_checkpoint_s=0" if self.budget_s <= 0 else "no step to save yet")
        elif self.aborted is None and not self._done:
            self._abort(f"a second {name} arrived")
        else:
            log.info("run.signal_ignored", signal=name, detail="stopping every actor already")

    def _abort(self, why: str) -> None:
        if self.aborted is None and not self._done and self._task is not None:
            self.aborted = why
            log.warning("run.interrupt_without_saving", why=why, detail="stopping every actor now")
            self._task.cancel()

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        """Around synchronous checkpoint writing, when the event loop cannot run ``_on_signal``: a signal while
        an interrupt's save is under way raises SaveAborted right there (the loop's handler then only logs it);
        a first signal is left to the loop's handler."""
        def on_signal(signum, _frame) -> None:
            if self.requested.is_set() and self.aborted is None and not self._done:
                self.aborted = f"a second {signal.Signals(signum).name} arrived"
                raise SaveAborted(self.aborted)

        before = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
