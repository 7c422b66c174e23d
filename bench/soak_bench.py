"""``everyprompt-bench soak``: a long real training run under steady faults, watched for growth.

One ``everyprompt-train`` run (tiny preset, the real DeepSpeed learner under torchrun, ``rollout.backend=sim``
with ``--workers`` simulated rollout workers, ``--workers-per-process`` per process; about one weight version
every 0.3-1 s) for ``--minutes`` (30 by default). While it runs:
- every ``--kill-every-s`` (jittered 0.5-1.5x) one actor is SIGKILLed, the kinds taken in turn from
  chaos_bench's KILL_KINDS (a simulated-worker process, a reward worker, a learner rank, torchrun), through
  bench/chaos_run.py's ChaosRun, and the bench waits until the run has recovered;
- every ``--hostile-every-s`` a burst of every hostile frame kind of transport/hostile.py (plus port-scanner
  bytes and the replayed Hello of a killed worker) goes to the live coordinator's socket;
- every ``--sample-s`` the RSS (/proc/<pid>/status VmRSS) and the open file descriptors (/proc/<pid>/fd) of the
  coordinator and of every process of the run are sampled;
- the coordinator's event-loop lag is recorded (a 20 ms sleep, how late it wakes, as bench/pipeline_bench.py
  measures it): the coordinator is started as ``python -m bench.soak_bench --as-coordinator LAGFILE <argv>``,
  which is ``python -m engine.coordinator <argv>`` with that probe as one more task on its event loop.
At the end the run gets SIGTERM (it checkpoints its last completed step, exit 143), is resumed with
``resume=true`` for 2 more steps, and the prompt ids trained across both are checked: each of the first
steps x 8 ids exactly once (``prompts_lost``, ``prompts_duplicated``, as chaos_bench counts them).

Growth is the least-squares slope (MiB/hour, fds/hour) of each process over the second half of the RL phase,
skipping each process's first ``--settle-s`` seconds; a process is judged when its samples there span at least a
quarter of that window (restarted actors often do not: a learner kill restarts every actor).
Bound: a process counts as bounded when its slope, extrapolated over a 3-day job, stays under 1 GiB of RSS
(``RSS_BOUND_MIB_PER_H`` = 14 MiB/hour) and under 256 descriptors (``FD_BOUND_PER_H`` = 3.5 fds/hour, a quarter of
the usual soft limit of 1,024). A leak of one object per step or one socket per restart would exceed both within
the default 30 minutes; a short run's window is too short to resolve such slopes (its noise is reported as is).
Was it met (2 loaded cores)? Zero loss: yes (3- to 30-minute runs, 0 lost, 0 duplicated). The bound: not met.
In the 30-minute run (a7d338d) the coordinator grew +39 MiB/h and +6.6 fds/h over its second half; the fd slope
comes from the faults (none without them). Stalls the soak found (a stranded sim-worker process, a replayed Hello,
a late WeightsLoaded holding every eval) are fixed. Figures and commands: docs/benchmarks.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.chaos_bench import KILL_KINDS

RSS_BOUND_MIB_PER_H = 1024 / 72  # 1 GiB over a 3-day job
FD_BOUND_PER_H = 256 / 72  # 256 descriptors over a 3-day job
MAX_FRAME = 4 * 1024 * 1024  # the run's transport.max_frame_bytes (hostile frames are sized from it)
LAG_PERIOD_S = 0.02
TRACE_ENV = "EVERYPROMPT_SOAK_TRACE_MEMORY_S"  # --trace-memory, passed to the coordinator child


# ---- the coordinator with a loop-lag probe (runs in the child) ----------------------------------------------


async def _lag_probe(path: Path) -> None:
    """Append ``<monotonic time> <lag ms>`` lines to ``path``: how late a ``LAG_PERIOD_S`` sleep wakes."""
    with open(path, "a") as f:
        last = flushed = time.monotonic()
        lines: list[str] = []
        while True:
            await asyncio.sleep(LAG_PERIOD_S)
            now = time.monotonic()
            lines.append(f"{now:.4f} {(now - last - LAG_PERIOD_S) * 1000:.3f}\n")
            last = now
            if now - flushed >= 1.0:
                f.writelines(lines)
                f.flush()
                lines.clear()
                flushed = now


async def _trace_memory(path: Path, every_s: float) -> None:
    """Every ``every_s`` seconds, append to ``path`` the 25 source lines whose live Python allocations grew most
    since the first snapshot (``--trace-memory``: tracemalloc in the coordinator, to find what an RSS slope is), and
    the RSS before and after glibc's ``malloc_trim(0)`` (a drop is freed memory the allocator kept, not a leak)."""
    import ctypes
    import tracemalloc

    tracemalloc.start(4)
    await asyncio.sleep(every_s)
    first = tracemalloc.take_snapshot()
    t0 = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        stats = tracemalloc.take_snapshot().compare_to(first, "traceback")
        rss = _read_proc(os.getpid())[0]
        trimmed = ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc holds freed but not returned
        with open(path, "a") as f:
            f.write(f"## +{time.monotonic() - t0:.0f} s, traced {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MiB, "
                    f"RSS {rss:.1f} MiB, after malloc_trim {_read_proc(os.getpid())[0]:.1f} MiB (returned: {trimmed})\n")
            for st in stats[:25]:
                f.write(f"{st.size_diff / 2**10:+10.1f} KiB {st.count_diff:+8d} blocks  "
                        f"{' <- '.join(f'{fr.filename}:{fr.lineno}' for fr in st.traceback)}\n")


def _as_coordinator(argv: list[str]) -> int:
    """``engine.coordinator``'s main, its whole run on one event loop next to ``_lag_probe``."""
    import transport
    from engine.coordinator.cli import main as coordinator_main

    lag_path, plain_run = Path(argv[0]), transport.run

    def probed(coro):
        async def both():
            loop = asyncio.get_running_loop()
            probes = [loop.create_task(_lag_probe(lag_path), name="soak.lag_probe")]
            if every := float(os.environ.get(TRACE_ENV, "0")):
                probes.append(loop.create_task(_trace_memory(lag_path.with_name("tracemalloc.txt"), every)))
            try:
                return await coro
            finally:
                for probe in probes:
                    probe.cancel()
        return plain_run(both())

    transport.run = probed  # cli.main imports it by name only when the run starts
    return coordinator_main(argv[1:])


# ---- the run and its processes ------------------------------------------------------------------------------


def _soak_run_class():
    from bench.chaos_run import ACTORS, ChaosRun

    class SoakRun(ChaosRun):
        """A ChaosRun whose rollout workers are simulated (engine/backends/sim.py processes) and whose
        coordinator carries the loop-lag probe."""

        actors = {**ACTORS, "rollout": (("engine.backends.sim",), ())}
        coordinator_module = "bench.soak_bench"

        def argv(self, *extra: str) -> list[str]:
            a = super().argv(*extra)
            return [*a[:3], "--as-coordinator", str(self.out_dir / "loop_lag.txt"), *a[3:]]

    return SoakRun


def _label(run, pid: int, cmd: str) -> str:
    if pid == run.proc.pid:
        return "coordinator"
    words = cmd.split()
    wid = words[words.index("--worker-id") + 1] if "--worker-id" in words else ""
    for kind, (want, avoid) in run.actors.items():
        if all(w in cmd for w in want) and not any(w in cmd for w in avoid):
            return {"rollout": f"sim-workers-{wid}", "reward": f"reward-{wid}"}.get(kind, kind)
    return "other"


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _read_proc(pid: int) -> tuple[float, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None  # gone between the listing and the read


class Sampler(threading.Thread):
    """Every ``period`` s: (time, RSS MiB, open fds) of the coordinator and each process of the run."""

    def __init__(self, run, period: float) -> None:
        super().__init__(daemon=True, name="soak.sampler")
        self.soak_run, self.period, self.stop = run, period, threading.Event()
        self.series: dict[tuple[str, int], list[tuple[float, float, int]]] = {}
        self.ours = _ancestors()  # this bench and what started it (their command lines name the folder too)

    def sample(self) -> None:
        from bench.chaos_run import _cmdline

        run = self.soak_run
        mark, now = str(run.out_dir), time.monotonic()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in self.ours:
                continue
            pid = int(d.name)
            cmd = _cmdline(pid)
            if pid != run.proc.pid and mark not in cmd:
                continue
            got = _read_proc(pid)
            if got is not None:
                self.series.setdefault((_label(run, pid, cmd), pid), []).append((now, *got))

    def run(self) -> None:  # noqa: D102 - threading.Thread's entry point
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.period)


def _slope_per_hour(t: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(t / 3600.0, y, 1)[0])


def growth(series: dict, t0: float, t1: float, settle_s: float) -> list[dict]:
    """Per process, slopes over [t0, t1] after its first ``settle_s`` seconds; judged when that spans >= 1/4."""
    rows = []
    for (label, pid), samples in sorted(series.items()):
        first = samples[0][0]
        use = np.array([s for s in samples if t0 <= s[0] <= t1 and s[0] >= first + settle_s] or np.zeros((0, 3)))
        span = float(np.ptp(use[:, 0])) if len(use) else 0.0
        judged = len(use) >= 3 and span >= (t1 - t0) / 4
        rss_slope = _slope_per_hour(use[:, 0], use[:, 1]) if judged else None  # JSON null, not NaN
        fd_slope = _slope_per_hour(use[:, 0], use[:, 2]) if judged else None
        rows.append({"process": label, "pid": pid, "samples": len(samples), "window_samples": len(use),
                     "window_span_s": span, "rss_mib_first": samples[0][1], "rss_mib_last": samples[-1][1],
                     "rss_mib_max": max(s[1] for s in samples), "fds_first": samples[0][2],
                     "fds_last": samples[-1][2], "fds_max": max(s[2] for s in samples), "judged": judged,
                     "rss_mib_per_hour": rss_slope, "fds_per_hour": fd_slope,
                     "bounded": (rss_slope <= RSS_BOUND_MIB_PER_H and fd_slope <= FD_BOUND_PER_H) if judged
                     else None})
    return rows


def _loop_lag(path: Path, t0: float, t1: float) -> dict:
    try:
        lags = [float(b) for a, b in (line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
                if t0 <= float(a) <= t1]
    except OSError:
        lags = []
    if not lags:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    arr = np.array(lags)
    return {"samples": len(arr), "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "max_ms": float(arr.max())}


# ---- faults -------------------------------------------------------------------------------------------------


def hostile_burst(run, per_kind: int, seed: int, replay: tuple[str, int, int] | None) -> int:
    """Every kind of transport/hostile.py at the coordinator's current socket (it changes when a learner failure
    restarts the actors); returns the frames sent that the hub counts (0 when no socket is known right now)."""
    from transport.hostile import KINDS, attack, replay_hello, tcp_garbage

    try:
        endpoint = run.endpoint()
    except AssertionError:  # every worker is being restarted: no socket to read right now
        return 0
    counted = 0
    try:
        for kind in KINDS:
            n = 1 if kind == "beyond_max_msg_size" else per_kind
            if attack(endpoint, kind, count=n, max_frame_bytes=MAX_FRAME, seed=seed, timeout_s=5.0):
                counted += n
        tcp_garbage(endpoint, seed=seed)
        if replay is not None:
            replay_hello(endpoint, role=replay[0], worker_id=replay[1], pid=replay[2], timeout_s=5.0)
    except OSError:  # the socket went away mid-burst (a recovery started): the rest is not sent
        pass
    return counted


def soak(a: argparse.Namespace, out: Path) -> dict:
    SoakRun = _soak_run_class()
    overrides = ["rollout.backend=sim", f"rollout.num_workers={a.workers}", "rollout.return_routes=false",
                 f"sim.workers_per_process={a.workers_per_process}", "learner.router_replay=off",
                 f"learner.num_ranks={a.ranks}", f"train.checkpoint_every={a.checkpoint_every}",
                 "transport.peer_timeout_s=8", f"transport.max_frame_bytes={MAX_FRAME}",
                 "transport.max_actor_restarts=100000", "transport.max_learner_restarts=100000", *a.overrides]
    run = SoakRun(out, steps=10_000_000, overrides=overrides, sft_cache=Path(a.sft_cache) if a.sft_cache else None)
    rng, kinds = random.Random(a.seed), [k for k in a.kinds.split(",") if k]
    sampler = Sampler(run, a.sample_s)
    events, failures, hostile_sent, bursts, replay = [], [], 0, 0, None
    try:
        run.start()  # inside the try: a SIGTERM right after the Popen still stops the run (bench/cli.py)
        sampler.start()
        try:
            run.wait_steps(1, timeout=600)
        except AssertionError as e:
            failures.append(f"no first step: {str(e)[:1500]}")
        t_rl = time.monotonic()
        t_end = t_rl + (0 if failures else a.minutes * 60)
        next_kill = t_rl + a.kill_every_s * rng.uniform(0.5, 1.5)
        next_hostile = t_rl + a.hostile_every_s
        last_steps, last_step_t, steps_at_burst = 0, time.monotonic(), 0
        while time.monotonic() < t_end:
            now = time.monotonic()
            if (n := len(run.step_rows())) != last_steps:
                last_steps, last_step_t = n, now
            elif now - last_step_t > a.stall_s:
                failures.append(f"no new step for {a.stall_s:.0f} s (steps: {n}); the run is stuck")
                break
            if kinds and now >= next_kill and t_end - now > a.kill_every_s / 4:
                kind = kinds[len(events) % len(kinds)]
                at = len(run.step_rows())
                try:
                    pid, t_kill = run.kill(kind)
                    rec = run.wait_recovered(kind, pid, t_kill, timeout=300)
                    events.append({"kind": kind, "pid": pid, "at_s": t_kill - t_rl, "at_step": at, "recovery_s": rec})
                    if kind == "reward":
                        replay = ("reward", _reward_worker_id(run, pid), pid)  # its Hello, replayed later
                except AssertionError as e:
                    stuck = len(run.step_rows()) == at  # not one step since the kill: the run is stuck, not slow
                    why = f"no new step after the kill (steps: {at}); " if stuck else ""
                    failures.append(f"{kind}: {why}{str(e)[:1500]}")
                    break
                next_kill = time.monotonic() + a.kill_every_s * rng.uniform(0.5, 1.5)
            elif now >= next_hostile:
                hostile_sent += hostile_burst(run, a.hostile_per_kind, seed=bursts, replay=replay)
                bursts, steps_at_burst = bursts + 1, len(run.step_rows())
                next_hostile = time.monotonic() + a.hostile_every_s
            else:
                time.sleep(0.05)
                if not run.alive():
                    failures.append(f"the run ended early (rc={run.proc.returncode}): {run.stderr()[-1500:]}")
                    break
        t_stop = time.monotonic()
        if bursts and not failures:  # a step row counts the frames rejected before it: wait for one after the
            try:  # last burst (a short soak on a loaded box can end right after one, its rejections unreported)
                run.wait_steps(steps_at_burst + 1, timeout=a.stall_s)
            except AssertionError as e:
                failures.append(f"no step after the last hostile burst: {str(e)[:1500]}")
        sampler.stop.set()
        sampler.join(timeout=30)
        rows = run.step_rows()
        interrupted = run.interrupt(signal.SIGTERM) if not failures else {}
    finally:
        sampler.stop.set()
        run.stop()
    mid = t_rl + (t_stop - t_rl) / 2
    procs = growth(sampler.series, mid, t_stop, a.settle_s)
    result = {"rl_s": t_stop - t_rl, "window_s": t_stop - mid, "steps_before_sigterm": len(rows),
              "weight_versions": max((r.get("version", 0) for r in rows), default=0),
              "kills": events, "failures": failures, "hostile_bursts": bursts, "hostile_frames_sent": hostile_sent,
              "frames_rejected": max((r.get("frames_rejected", 0) for r in rows), default=0),
              "learner_restarts": max((r.get("learner_restarts", 0) for r in rows), default=0),
              "actor_restarts": max((r.get("actor_restarts", 0) for r in rows), default=0),
              "processes": procs, "loop_lag_ms": _loop_lag(out / "loop_lag.txt", t_rl, t_stop),
              "loop_lag_ms_second_half": _loop_lag(out / "loop_lag.txt", mid, t_stop),
              "interrupt": interrupted}
    result["versions_per_minute"] = result["weight_versions"] / max(result["rl_s"] / 60, 1e-9)
    result.update(_resume(run, interrupted, failures))
    judged = [p for p in procs if p["judged"]]
    result["bound"] = {"rss_mib_per_hour": RSS_BOUND_MIB_PER_H, "fds_per_hour": FD_BOUND_PER_H}
    result["bounded"] = bool(judged) and all(p["bounded"] for p in judged)
    return result


def _reward_worker_id(run, pid: int) -> int:
    """The worker id of a (now dead) reward worker, from the coordinator's ``actor.joined`` line for it."""
    import re

    found = re.findall(rf"actor\.joined\s+name=reward-(\d+) pid={pid}\b", run.stderr())
    return int(found[-1]) if found else 0


def _resume(run, interrupted: dict, failures: list[str]) -> dict:
    """``resume=true`` for 2 more steps, then the ledger over every step: each prompt id trained exactly once."""
    step = interrupted.get("checkpoint_step")
    if failures or not step or interrupted.get("rc") != 128 + signal.SIGTERM:
        failures.append(f"no checkpoint to resume from after SIGTERM: {interrupted}")
        return {"prompts_lost": None, "prompts_duplicated": None, "ledger": {}, "resumed_steps": 0}
    res = run.resume_exactly_once(step, more_steps=2)
    if "failed" in res:
        failures.append(f"resume: {res['failed']}")
    ledger = res["ledger"]
    return {"prompts_lost": ledger["lost"], "prompts_duplicated": ledger["duplicated"], "ledger": ledger,
            "resumed_steps": res["resumed_to_step"], "resumed_from_step": res.get("resumed_from_step")}


def _print(m: dict) -> None:
    from bench.common import print_table

    shown = sorted((p for p in m["processes"] if p["samples"] >= 3), key=lambda p: (not p["judged"], p["process"]))
    if shown:
        print_table(["process", "pid", "samples", "window s", "RSS first", "RSS last", "RSS MiB/h", "fds first",
                     "fds last", "fds/h", "bounded"],
                    [[p["process"], p["pid"], p["samples"], p["window_span_s"], p["rss_mib_first"],
                      p["rss_mib_last"], p["rss_mib_per_hour"] if p["judged"] else "-", p["fds_first"],
                      p["fds_last"], p["fds_per_hour"] if p["judged"] else "-",
                      {None: "not judged", True: "yes", False: "NO"}[p["bounded"]]] for p in shown])
    by_kind: dict[str, list[float]] = {}
    for e in m["kills"]:
        by_kind.setdefault(e["kind"], []).append(e["recovery_s"])
    lag = m["loop_lag_ms"]
    print(f"RL {m['rl_s']:.0f} s, {m['steps_before_sigterm']} steps, {m['weight_versions']} weight versions "
          f"({m['versions_per_minute']:.0f}/min); kills "
          f"{ {k: (len(v), round(max(v), 1)) for k, v in by_kind.items()} } (count, max recovery s); "
          f"hostile frames sent {m['hostile_frames_sent']} in {m['hostile_bursts']} bursts, frames_rejected "
          f"{m['frames_rejected']}; loop lag p50/p99/max {lag['p50_ms']}/{lag['p99_ms']}/{lag['max_ms']} ms; "
          f"SIGTERM -> exit {m['interrupt'].get('rc')} with checkpoint at step {m['interrupt'].get('checkpoint_step')}"
          f", resumed to step {m['resumed_steps']}; prompts lost {m['prompts_lost']}, duplicated "
          f"{m['prompts_duplicated']}; bound (MiB/h, fds/h) ({RSS_BOUND_MIB_PER_H:.1f}, {FD_BOUND_PER_H:.2f}) met: "
          f"{m['bounded']}; failures: {m['failures'] or 'none'}", flush=True)


def main(argv: list[str]) -> dict:
    from engine.log import configure_logging

    p = argparse.ArgumentParser(prog="everyprompt-bench soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="RL time under faults before the SIGTERM")
    p.add_argument("--workers", type=int, default=64, help="simulated rollout workers")
    p.add_argument("--workers-per-process", type=int, default=16, help="simulated workers per process")
    p.add_argument("--ranks", type=int, default=1, help="learner ranks (torchrun)")
    p.add_argument("--kill-every-s", type=float, default=60.0, help="mean seconds between SIGKILLs")
    p.add_argument("--kinds", default=",".join(KILL_KINDS),
                   help="comma-separated kinds killed in turn, of " + ", ".join(KILL_KINDS) + " ('' = no kills)")
    p.add_argument("--hostile-every-s", type=float, default=15.0, help="seconds between bursts of hostile frames")
    p.add_argument("--hostile-per-kind", type=int, default=20, help="frames of each hostile kind per burst")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS / fd samples")
    p.add_argument("--settle-s", type=float, default=30.0, help="a process's first seconds, left out of its slope")
    p.add_argument("--stall-s", type=float, default=180.0, help="no new step for this long fails the soak")
    p.add_argument("--checkpoint-every", type=int, default=20, help="train.checkpoint_every")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--trace-memory", type=float, default=0.0, metavar="S",
                   help="run tracemalloc in the coordinator and write its top growers to OUT/tracemalloc.txt every "
                        "S seconds (slows the coordinator; for finding an RSS slope, not for the bound)")
    p.add_argument("--sft-cache", default=None, help="cold-start SFT cache to share (default: one in --out)")
    p.add_argument("--out", default=None, help="folder for the run (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="key=value passed to the run")
    a = p.parse_args(argv)
    bad = [k for k in a.kinds.split(",") if k and k not in KILL_KINDS]
    if bad:
        p.error(f"unknown kind(s) {bad} in --kinds; choose from {', '.join(KILL_KINDS)}")
    configure_logging(role="bench", level=logging.ERROR)
    if a.trace_memory > 0:
        os.environ[TRACE_ENV] = str(a.trace_memory)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="everyprompt-soak-") as tmp:
        m = soak(a, Path(a.out or tmp))
    m["wall_s"] = time.monotonic() - t0
    _print(m)
    return {"config": vars(a), "metrics": m}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-coordinator"]:
        sys.exit(_as_coordinator(sys.argv[2:]))
    sys.exit("run it as: everyprompt-bench soak [--minutes M] (see --help)")
