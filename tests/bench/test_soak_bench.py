"""``everyprompt-bench soak`` for a few seconds of RL: a real run (simulated rollout workers, the DeepSpeed
learner), hostile frames at its coordinator, the RSS / fd sampler and the loop-lag probe, SIGTERM, the resume,
and the ledger of every prompt id. The long soak is the bench itself (docs/benchmarks.md, "Soak")."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pathlib import Path

from tests.helpers import processes_mentioning, wait_for

KEYS = {"rl_s", "window_s", "steps_before_sigterm", "weight_versions", "versions_per_minute", "kills", "failures",
        "hostile_frames_sent", "frames_rejected", "processes", "loop_lag_ms", "interrupt", "prompts_lost",
        "prompts_duplicated", "ledger", "bound", "bounded"}


@pytest.mark.timeout(30)
def test_help_names_the_duration_flag():
    out = subprocess.run([sys.executable, "-m", "bench.cli", "soak", "--help"], capture_output=True, text=True,
                         timeout=25)
    assert out.returncode == 0, out.stderr
    assert "--minutes" in out.stdout and "bounded" in out.stdout


@pytest.mark.timeout(420)  # about 60 s on an idle 2-core box; a loaded one (load 10+) takes 2-3 minutes
def test_a_short_soak_trains_every_prompt_once_and_reports_growth_and_lag(tmp_path):
    argv = [sys.executable, "-m", "bench.cli", "soak", "--minutes", "0.05", "--kinds", "", "--workers", "8",
            "--workers-per-process", "8", "--sample-s", "0.5", "--settle-s", "0", "--hostile-every-s", "1",
            "--hostile-per-kind", "3", "--out", str(tmp_path), "sft.max_steps=1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "soak"
    m = result["metrics"]
    assert KEYS <= set(m), KEYS - set(m)
    assert m["failures"] == [], m["failures"]
    assert m["prompts_lost"] == 0 and m["prompts_duplicated"] == 0, m["ledger"]
    assert m["ledger"]["steps_ok"] and m["ledger"]["unexpected"] == 0, m["ledger"]
    assert m["interrupt"]["rc"] == 143 and m["interrupt"]["checkpoint_step"] >= 1, m["interrupt"]
    assert m["steps_before_sigterm"] >= 1 and m["weight_versions"] >= 1
    assert m["hostile_frames_sent"] > 0 and m["frames_rejected"] >= 1
    assert m["loop_lag_ms"]["samples"] > 0 and m["loop_lag_ms"]["max_ms"] >= m["loop_lag_ms"]["p50_ms"] >= 0
    kinds = {p["process"] for p in m["processes"]}
    assert {"coordinator", "sim-workers-0", "reward-0", "torchrun", "learner_rank"} <= kinds, kinds
    coordinator = next(p for p in m["processes"] if p["process"] == "coordinator")
    assert coordinator["rss_mib_max"] > 0 and coordinator["fds_max"] > 0
    assert m["bound"]["rss_mib_per_hour"] > 0 and m["bound"]["fds_per_hour"] > 0
    deadline = time.monotonic() + 60  # torchrun and its ranks exit after the coordinator; slow on a loaded box
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == [], "processes of the run left behind"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.timeout(300)
def test_sigterm_to_the_bench_stops_the_run_it_started(tmp_path):
    """The run lives in a session of its own (it must not get the terminal's Ctrl-C twice), so the bench has to
    stop it: SIGTERM to the bench alone leaves no process of the run behind."""
    argv = [sys.executable, "-m", "bench.cli", "soak", "--minutes", "30", "--kinds", "", "--workers", "8",
            "--workers-per-process", "8", "--out", str(tmp_path / "soak"), "sft.max_steps=1"]
    with open(tmp_path / "bench.err", "w") as err:
        bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            mark = str(tmp_path / "soak")
            wait_for(lambda: any("actors.reward_worker" in _cmdline(p) for p in processes_mentioning(mark)), bench,
                     240, "the run's reward worker to start")
            bench.send_signal(signal.SIGTERM)
            assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        finally:
            if bench.poll() is None:
                bench.kill()
    deadline = time.monotonic() + 60
    while processes_mentioning(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {p: _cmdline(p) for p in processes_mentioning(mark)}
    for pid in left:  # a failure here must not leave them to the next tests
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, list(left.values())
