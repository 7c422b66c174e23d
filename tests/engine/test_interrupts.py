"""engine/coordinator/recovery.py::Interrupts with real signals sent to this process, on the run's uvloop: the first
one asks for a save; a second aborts the save at once (inside synchronous writing too), the time limit aborts it,
and with nothing to save the first one stops at once."""

import asyncio
import os
import signal
import time

import pytest

from engine.coordinator.recovery import Interrupts, SaveAborted
from transport import run

pytestmark = pytest.mark.timeout(60)


def _in_loop(body):
    async def main():
        interrupts = Interrupts(budget_s=30)
        interrupts.install()
        try:
            return await body(interrupts)
        finally:
            interrupts.uninstall()
    return run(main())


def _busy(seconds: float) -> None:
    """Synchronous work the event loop cannot interrupt (a checkpoint's sha256 over big files)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def test_a_second_signal_aborts_synchronous_checkpoint_writing_at_once():
    async def body(interrupts):
        interrupts.saving = True
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(interrupts.requested.wait(), 10)
        t0 = time.monotonic()
        with pytest.raises(SaveAborted), interrupts.abortable():
            os.kill(os.getpid(), signal.SIGINT)
            _busy(20)
        took = time.monotonic() - t0
        await asyncio.sleep(0)  # the loop's own handler sees the second signal too: it only logs
        return interrupts, took

    interrupts, took = _in_loop(body)
    assert took < 5 and interrupts.name == "SIGTERM" and "second SIGINT" in interrupts.aborted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back on uninstall


def test_a_first_signal_during_a_periodic_save_waits_for_the_loop():
    async def body(interrupts):
        interrupts.saving = True
        with interrupts.abortable():  # not an interrupt's save: the signal must not abort it
            os.kill(os.getpid(), signal.SIGINT)
            _busy(0.5)
        await asyncio.wait_for(interrupts.requested.wait(), 10)
        return interrupts

    interrupts = _in_loop(body)
    assert interrupts.name == "SIGINT" and interrupts.aborted is None


@pytest.mark.parametrize("saving, budget_s, why", [(True, 0.5, "ran out"), (False, 30, "no step to save yet"),
                                                   (True, 0, "interrupt_checkpoint_s=0")])
def test_the_run_is_cancelled_when_the_save_cannot_happen(saving, budget_s, why):
    async def body(interrupts):
        interrupts.saving, interrupts.budget_s = saving, budget_s
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.sleep(20)
        asyncio.current_task().uncancel()
        return interrupts

    interrupts = _in_loop(body)
    assert why in interrupts.aborted
