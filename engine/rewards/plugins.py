"""Reward plugins: a registry by name, and the process pool the reward worker runs them in.

A plugin is a function ``fn(response: str, reference: str, options: dict) -> PluginScore``; ``options`` holds
``sandbox`` (the ``reward.sandbox`` SandboxConfig). ``reward.plugin`` names a built-in (``exact`` (default),
``math``, ``code``, ``instruction``, ``choice``: the ``@builtin`` registry of engine/rewards/verifiers.py) or any
importable ``package.module:function``. ``judge`` is group-level (engine/rewards/judge.py): its per-response
verifier is ``reward.judge.verifier``.

``PluginPool`` runs the plugin in ``reward.plugin_processes`` spawned processes, one response per call, each
call as soon as the response arrives. A call that raises, exceeds ``reward.plugin_timeout_s`` or kills its
process comes back as a recorded failure (``valid=False`` with the reason in ``parts``); a hung or dead process
is killed and replaced, and the pool keeps serving.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing as mp
import time

import structlog

from engine.rewards.verifiers import VERIFIERS, PluginScore, Verifier

log = structlog.get_logger()


def resolve(name: str) -> Verifier:
    """A plugin by built-in name or ``module:function``; raises ValueError naming the fix."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"reward plugin {name!r} is neither built in ({', '.join(VERIFIERS)}) nor "
                         f"'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward plugin {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"reward plugin {name!r} is not a function")
    return fn


def failure(reason: str) -> PluginScore:
    """A recorded failure: invalid (out of Eq. 11's set), reward 0, the reason as a part."""
    return PluginScore(0.0, {f"plugin_{reason}": 1.0}, valid=False)


def _serve(conn, name: str, options: dict) -> None:
    """A pool process: say it is ready, then score requests until the pipe closes. Exceptions go back as failures."""
    try:
        fn = resolve(name)
    except ValueError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready",))
    while True:
        try:
            response, reference = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        try:
            s = fn(response, reference, options)
            conn.send(("ok", float(s.score), {k: float(v) for k, v in s.parts.items()}, bool(s.valid)))
        except Exception as e:  # the plugin boundary: any error of the plugin is a recorded failure
            conn.send(("error", repr(e)[:500]))


_START_TIMEOUT_S = 120.0  # a fresh process imports the plugin before its first call (not part of the call timeout)


class _Slot:
    def __init__(self, ctx, name: str, options: dict) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, options), daemon=True,
                                name=f"reward-plugin-{name}")
        self.proc.start()
        child.close()
        try:
            ready = self.conn.recv() if self.conn.poll(_START_TIMEOUT_S) else ("error", "no answer")
        except EOFError:
            ready = ("error", f"exited with code {self.proc.exitcode}")
        if ready[0] != "ready":
            self.kill()
            raise RuntimeError(f"reward plugin process for {name!r} did not start: {ready[1]}")

    def kill(self) -> None:
        self.proc.kill()  # our own child, by handle
        self.proc.join(5)
        self.conn.close()


class PluginPool:
    """``await pool.score(response, reference)`` -> PluginScore; at most ``num_procs`` calls run at once."""

    def __init__(self, name: str, options: dict | None = None, *, num_procs: int = 2, timeout_s: float = 10.0):
        resolve(name)  # fail now, in the caller, on a bad name
        self._name, self._options, self._timeout_s = name, options or {}, timeout_s
        self._ctx = mp.get_context("spawn")
        self._slots = [_Slot(self._ctx, name, self._options) for _ in range(num_procs)]
        self._idle: asyncio.Queue[_Slot] | None = None
        self.counts = {"calls": 0, "error": 0, "timeout": 0, "crash": 0, "replaced": 0}

    async def score(self, response: str, reference: str) -> PluginScore:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for s in self._slots:
                self._idle.put_nowait(s)
        slot = await self._idle.get()
        self.counts["calls"] += 1
        try:
            result, new = await asyncio.to_thread(self._call, slot, response, reference)
        except BaseException:
            self._idle.put_nowait(slot)
            raise
        if new is not slot:
            self._slots[self._slots.index(slot)] = new
        self._idle.put_nowait(new)
        return result

    def _call(self, slot: _Slot, response: str, reference: str) -> tuple[PluginScore, _Slot]:
        t0 = time.monotonic()
        try:
            slot.conn.send((response, reference))
            if slot.conn.poll(self._timeout_s):
                reply = slot.conn.recv()
                if reply[0] == "ok":
                    return PluginScore(reply[1], reply[2], reply[3]), slot
                self.counts["error"] += 1
                log.warning("reward.plugin_failed", plugin=self._name, error=reply[1])
                return failure("error"), slot
            reason = "timeout"
        except (EOFError, OSError):  # the process died mid-call (e.g. a segfault, the OOM killer)
            reason = "crash"
        self.counts[reason] += 1
        log.warning("reward.plugin_replaced", plugin=self._name, reason=reason, seconds=time.monotonic() - t0)
        slot.kill()
        self.counts["replaced"] += 1
        return failure(reason), _Slot(self._ctx, self._name, self._options)

    def close(self) -> None:
        for s in self._slots:
            s.kill()
