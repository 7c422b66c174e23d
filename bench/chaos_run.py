"""Drive a real ``everyprompt-train`` run and inject faults into it: the chaos tests and ``everyprompt-bench
chaos`` share this. Everything is real: the coordinator and its actors are child processes on 127.0.0.1,
faults are signals (SIGKILL, SIGSTOP) and frames sent to the coordinator's socket.

Processes are found by the run's unique output folder on their command line, never by name alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

# kind of actor -> (words its command line holds, words it must not hold)
ACTORS = {
    "rollout": (("actors.rollout_worker",), ()),
    "reward": (("actors.reward_worker",), ()),
    "learner_rank": (("actors.learner",), ("torch.distributed.run",)),
    "torchrun": (("torch.distributed.run",), ()),
}
FIRST_PROMPT_ID = 1_000_000  # the built-in task numbers its training prompts from here


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text()
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@dataclass
class ChaosRun:
    """One tiny-preset training run in ``out_dir``; ``overrides`` are extra key=value settings."""

    out_dir: Path
    steps: int
    overrides: list[str] = field(default_factory=list)
    groups_per_step: int = 8  # the tiny preset's
    sft_cache: Path | None = None  # share one cold-start SFT between runs (default: one per run)
    proc: subprocess.Popen | None = None
    env: dict | None = None  # extra environment variables of the run (e.g. the sglang stand-in's PYTHONPATH)
    actors: ClassVar[dict] = ACTORS  # a subclass with other actor processes names its own (bench/soak_bench.py)
    coordinator_module: ClassVar[str] = "engine.coordinator"  # what ``python -m`` starts

    @property
    def run_dir(self) -> Path:
        return self.out_dir / "tiny"

    def argv(self, *extra: str) -> list[str]:
        sft_cache = self.sft_cache or self.out_dir / "sft_cache"
        return [sys.executable, "-m", self.coordinator_module, "--config-name", "tiny", f"out_dir={self.out_dir}",
                "progress=false", f"sft.cache_dir={sft_cache}", f"train.num_steps={self.steps}",
                "transport.heartbeat_s=0.5", *self.overrides, *extra]

    def start(self, *extra: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.out_dir / "stdout.txt", "w")  # noqa: SIM115 - open for the run's lifetime
        self._err = open(self.out_dir / "stderr.txt", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv(*extra), stdout=self._out, stderr=self._err, start_new_session=True,
                                     env={**os.environ, **self.env} if self.env else None)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def step_rows(self) -> list[dict]:
        return [r for r in _read_rows(self.run_dir / "metrics.jsonl") if "step" in r]

    def wait(self, predicate, timeout: float, what: str, poll_s: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"run ended (rc={self.proc.returncode}) while waiting for {what}; "
                                     f"stderr tail:\n{self.stderr()[-3000:]}")
            if predicate():
                return
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def wait_steps(self, n: int, timeout: float = 300) -> None:
        self.wait(lambda: len(self.step_rows()) >= n, timeout, f"step {n}")

    def pids(self, kind: str) -> list[int]:
        want, avoid = self.actors[kind]
        mark = str(self.out_dir)
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                cmd = _cmdline(int(d.name))
                if mark in cmd and all(w in cmd for w in want) and not any(w in cmd for w in avoid):
                    out.append(int(d.name))
        return out

    def endpoint(self) -> str:
        """The coordinator's socket, read from a rollout worker's command line."""
        for pid in self.pids("rollout"):
            words = _cmdline(pid).split()
            if "--endpoint" in words:
                return words[words.index("--endpoint") + 1]
        raise AssertionError("no rollout worker to read the endpoint from")

    def kill(self, kind: str, sig: int = signal.SIGKILL, which: int = 0) -> tuple[int, float]:
        """Signal one process of ``kind`` (the ``which``-th by pid); returns (its pid, when)."""
        pids = sorted(self.pids(kind))
        assert pids, f"no {kind} process"
        self._joined_before = self._joined()
        os.kill(pids[which], sig)
        return pids[which], time.monotonic()

    def _joined(self) -> set[tuple[str, int]]:
        """(actor name, pid) of every actor the coordinator has logged as joined."""
        return {(m.group(1), int(m.group(2))) for m in re.finditer(r"actor\.joined\s+name=(\S+) pid=(\d+)",
                                                                     self.stderr())}

    def wait_recovered(self, kind: str, old_pid: int, t_kill: float, timeout: float = 300) -> float:
        """Seconds from ``t_kill`` until a replacement actor has connected to the coordinator (its Hello logged
        as ``actor.joined``) and a step not seen before the kill has been trained (after a learner failure the
        run first rolls back to its checkpoint, then trains again)."""
        seen = {(r["step"], r.get("elapsed_s")) for r in self.step_rows()}
        prefix = {"rollout": "rollout-", "reward": "reward-"}.get(kind, "learner")

        def done() -> bool:
            rejoined = any(name.startswith(prefix) for name, _ in self._joined() - self._joined_before)
            return rejoined and any((r["step"], r.get("elapsed_s")) not in seen for r in self.step_rows())

        self.wait(done, timeout, f"recovery from a {kind} kill (pid {old_pid})", poll_s=0.05)
        return time.monotonic() - t_kill

    def random_kills(self, kinds: list[str], rng, *, min_delay_s: float = 0.3, max_delay_s: float = 2.0,
                     margin_steps: int = 5) -> list[dict]:
        """SIGKILL each of ``kinds`` in turn, a random delay after the previous recovery (or after the first
        step), and wait for recovery. Stops early, without failing, when the run gets within ``margin_steps`` of
        its end. Returns one record per kill: kind, step, recovery_s."""
        self.wait_steps(1)
        events = []
        for kind in kinds:
            time.sleep(rng.uniform(min_delay_s, max_delay_s))
            if not self.alive() or len(self.step_rows()) >= self.steps - margin_steps:
                break
            pid, t_kill = self.kill(kind)
            events.append({"kind": kind, "at_step": len(self.step_rows()),
                           "recovery_s": self.wait_recovered(kind, pid, t_kill)})
        return events

    def coordinator_rss_mb(self) -> float:
        from transport.hostile import rss_mb

        return rss_mb(self.proc.pid)

    def finish(self, timeout: float = 600) -> dict:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self._out.close()
            self._err.close()
        lines = (self.out_dir / "stdout.txt").read_text().strip().splitlines()
        assert self.proc.returncode == 0 and lines, f"rc={self.proc.returncode}; stderr:\n{self.stderr()[-4000:]}"
        return json.loads(lines[-1])

    def interrupt(self, sig: int = signal.SIGTERM, timeout: float = 300) -> dict:
        """Send ``sig`` to the coordinator (it checkpoints its last completed step and exits 128 + sig) and wait
        for its exit: rc, exit_s, checkpoint_step, status. Its stdout/stderr are kept as ``interrupted-*.txt``
        (a resume in the same folder writes its own)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return {"rc": None, "exit_s": time.monotonic() - t0, "checkpoint_step": None, "status": "hung"}
        self._out.close()
        self._err.close()
        rows = _read_rows(self.out_dir / "stdout.txt")
        summary = rows[-1] if rows else {}
        for name in ("stdout.txt", "stderr.txt"):
            (self.out_dir / name).replace(self.out_dir / f"interrupted-{name}")
        return {"rc": self.proc.returncode, "exit_s": time.monotonic() - t0,
                "checkpoint_step": summary.get("checkpoint_step"), "status": summary.get("status")}

    def resume_exactly_once(self, from_step: int, more_steps: int = 2, timeout: float = 600) -> dict:
        """``resume=true`` in the same folder up to step ``from_step + more_steps``; then the ledger over every
        step of both: each of the first (steps x groups) prompt ids trained exactly once. recovery_s: from the
        resume command to its first new step."""
        resumed = type(self)(self.out_dir, steps=from_step + more_steps, overrides=self.overrides,
                             groups_per_step=self.groups_per_step, sft_cache=self.sft_cache, env=self.env)
        t0 = time.monotonic()
        resumed.start("resume=true")
        out = {"resumed_to_step": resumed.steps}
        try:
            resumed.wait_steps(from_step + 1, timeout=timeout)
            out["recovery_s"] = time.monotonic() - t0
            out["resumed_from_step"] = resumed.finish(timeout=timeout)["resumed_from_step"]
        except AssertionError as e:
            resumed.stop()
            out["failed"] = str(e)[:2000]
        return {**out, "ledger": resumed.ledger()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stderr(self) -> str:
        try:
            return (self.out_dir / "stderr.txt").read_text(errors="replace")
        except OSError:
            return ""

    def ledger(self) -> dict:
        """What was trained, against the expected prompt ids: lost, duplicated, and whether the steps are
        exactly 1..steps."""
        rows = _read_rows(self.run_dir / "prompts.jsonl")
        trained = [pid for r in rows for pid in r["prompt_ids"]]
        expected = set(range(FIRST_PROMPT_ID, FIRST_PROMPT_ID + self.steps * self.groups_per_step))
        return {"steps_ok": [r["step"] for r in rows] == list(range(1, self.steps + 1)),
                "trained": len(trained), "lost": len(expected - set(trained)),
                "duplicated": len(trained) - len(set(trained)), "unexpected": len(set(trained) - expected)}

    def orphans(self) -> list[int]:
        mark = str(self.out_dir)
        return [int(d.name) for d in Path("/proc").iterdir()
                if d.name.isdigit() and int(d.name) != os.getpid() and mark in _cmdline(int(d.name))]
