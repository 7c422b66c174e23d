"""Workers that hang or die mid-run: detected (heartbeat silence, process exit), restarted, their work re-queued,
and the run finishes every step."""

import json
import os
import signal
import subprocess
import sys

import pytest

from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning, wait_for

pytestmark = pytest.mark.timeout(420)


def _pid_of(tmp_path, module: str) -> int:
    pids = [p for p in processes_mentioning(str(tmp_path))
            if module in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
    assert len(pids) == 1, pids
    return pids[0]


def _start(tmp_path, *overrides: str):
    """(the run's Popen, a function giving its step rows so far): the tiny preset with fast heartbeats."""
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "transport.heartbeat_s=0.5", *overrides]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "tiny" / "metrics.jsonl"

    def steps():
        return [r for r in read_metrics(metrics) if "step" in r] if metrics.exists() else []

    return proc, steps


def test_hung_rollout_and_killed_reward_worker_are_restarted_and_nothing_is_lost(tmp_path):
    proc, steps = _start(tmp_path, "train.num_steps=400", "transport.peer_timeout_s=3")

    try:
        wait_for(lambda: len(steps()) >= 2, proc, 240, "the first steps")
        os.kill(_pid_of(tmp_path, "actors.rollout_worker"), signal.SIGSTOP)  # hung: alive but silent
        n = len(steps())
        wait_for(lambda: len(steps()) >= n + 3 and steps()[-1]["actor_restarts"] == 1, proc, 120,
                  "steps after the rollout worker restart")
        os.kill(_pid_of(tmp_path, "actors.reward_worker"), signal.SIGKILL)  # dead
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 400
    rows = steps()
    assert [r["step"] for r in rows] == list(range(1, 401))
    assert rows[-1]["actor_restarts"] == 2
    assert rows[-1]["continued_samples"] >= 1  # the silent worker held responses; without re-queueing no step follows
    assert max(r["version_lag_max"] for r in rows) <= 1
    assert "actor.restarting" in err and "rollout-0" in err and "reward-0" in err
    assert processes_mentioning(str(tmp_path)) == []


def test_a_killed_process_of_simulated_workers_loses_none_of_their_work(tmp_path):
    """One process hosts several simulated workers (sim.workers_per_process): killing it loses every one of
    them at once; each one's unfinished responses are re-queued (the process is restarted under its own name,
    its workers join again under theirs), and the run trains every step."""
    proc, steps = _start(tmp_path, "train.num_steps=40", "rollout.backend=sim", "rollout.num_workers=8",
                         "sim.workers_per_process=4", "rollout.return_routes=false", "learner.router_replay=off",
                         "transport.peer_timeout_s=10", "sim.time_scale=25")
    # sim.time_scale=25: decoding is slower than a learner step even on a loaded box, so the workers always hold
    # unfinished responses when the kill lands (at real speed they may all be idle, waiting for the learner)

    try:
        wait_for(lambda: len(steps()) >= 2, proc, 240, "the first steps")
        hosts = [p for p in processes_mentioning(str(tmp_path))
                 if "--count" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
        assert len(hosts) == 2, hosts
        os.kill(hosts[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    rows = steps()
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert rows[-1]["actor_restarts"] == 1 and rows[-1]["continued_samples"] >= 1, rows[-1]
    assert processes_mentioning(str(tmp_path)) == []
