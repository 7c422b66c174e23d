"""Lossless resume and the per-token staleness bound, on the real pipeline (tiny preset).

Resume: a run is killed (SIGKILL, no goodbye) at an arbitrary step after a checkpoint and resumed with
resume=true; every prompt of the stream is trained exactly once and no step is missing or repeated.
Staleness: the learner or one of two rollout workers is frozen mid-run; every step still trains only tokens within
train.max_staleness versions, and nothing is discarded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning, wait_for

pytestmark = pytest.mark.timeout(420)
GROUPS_PER_STEP = 8  # the tiny preset's train.groups_per_step


def _argv(tmp_path, *overrides):
    return [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "transport.heartbeat_s=0.5", *overrides]


def _steps(tmp_path) -> list[dict]:
    path = tmp_path / "tiny" / "metrics.jsonl"
    return [r for r in read_metrics(path) if "step" in r] if path.exists() else []


def _signal_all(tmp_path, words: tuple[str, ...], sig) -> None:
    """Send ``sig`` to every process of this test whose command line holds all of ``words``."""
    def cmdline(pid: int) -> str:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")

    pids = [p for p in processes_mentioning(str(tmp_path)) if all(w in cmdline(p) for w in words)]
    assert pids, words
    for p in pids:
        os.kill(p, sig)


def _finish(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_killed_run_resumes_and_trains_every_prompt_exactly_once(tmp_path):
    steps = 12
    common = [f"train.num_steps={steps}", "train.checkpoint_every=3"]
    proc = subprocess.Popen(_argv(tmp_path, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(_steps(tmp_path)) >= 5, proc, 300, "step 5 (a checkpoint at 3, two steps after it)",
                 poll_s=0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and everything it started, mid-flight
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _wait_for_no_orphans(tmp_path)
    killed_at = len(_steps(tmp_path))
    assert 5 <= killed_at < steps, killed_at

    resumed = subprocess.Popen(_argv(tmp_path, *common, "resume=true"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    summary = _finish(resumed)
    assert summary["steps"] == steps and 3 <= summary["resumed_from_step"] <= killed_at
    assert [r["step"] for r in _steps(tmp_path)] == list(range(1, steps + 1))  # none missing, none twice
    ledger = read_metrics(tmp_path / "tiny" / "prompts.jsonl")
    assert [r["step"] for r in ledger] == list(range(1, steps + 1))
    trained = [pid for r in ledger for pid in r["prompt_ids"]]
    assert len(trained) == len(set(trained)) == steps * GROUPS_PER_STEP  # no prompt twice
    assert set(trained) == set(range(1_000_000, 1_000_000 + steps * GROUPS_PER_STEP))  # none skipped
    assert summary["discarded_samples"] == 0


def _wait_for_no_orphans(tmp_path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == []


@pytest.mark.parametrize("frozen, extra", [(("actors.learner",), []),
                                           (("actors.rollout_worker", "--worker-id 1"), ["rollout.num_workers=2"])],
                         ids=["slow-learner", "slow-worker"])
def test_staleness_bound_holds_when_the_learner_or_a_worker_is_slow(tmp_path, frozen, extra):
    steps = 30
    proc = subprocess.Popen(_argv(tmp_path, f"train.num_steps={steps}", "transport.peer_timeout_s=20",
                                  "train.max_staleness=1", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_steps(tmp_path)) >= 3, proc, 300, "the first steps", poll_s=0.02)
        _signal_all(tmp_path, frozen, signal.SIGSTOP)
        time.sleep(3.0)
        _signal_all(tmp_path, frozen, signal.SIGCONT)
        summary = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = _steps(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert max(r["version_lag_max"] for r in rows) <= 1 and summary["max_token_staleness"] <= 1
    assert summary["discarded_samples"] == 0
    assert rows[-1]["regenerated_samples"] == summary["samples_over_bound"]  # each one handled, none dropped
