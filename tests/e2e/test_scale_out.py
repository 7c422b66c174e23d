"""Scale-out on one machine over loopback: a second torchrun agent joining an elastic learner and losing a rank,
and a stand-alone rollout worker joining a running job, both with the commands the coordinator writes to
runs/<name>/join.json."""

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning, wait_for

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, *overrides):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "transport.heartbeat_s=0.5",
            "transport.peer_timeout_s=5", f"transport.port={_free_port()}", *overrides]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(tmp_path):
    path = tmp_path / "tiny" / "metrics.jsonl"
    return [r for r in read_metrics(path) if "step" in r] if path.exists() else []


def _join(tmp_path) -> dict:
    return json.loads((tmp_path / "tiny" / "join.json").read_text())


def _trained_once(tmp_path, steps: int, groups: int) -> None:
    ledger = [json.loads(line) for line in (tmp_path / "tiny" / "prompts.jsonl").read_text().splitlines()]
    ids = [p for row in ledger for p in row["prompt_ids"]]
    assert [row["step"] for row in ledger] == list(range(1, steps + 1))
    assert len(ids) == steps * groups and len(set(ids)) == len(ids)  # none lost, none twice


def test_a_second_learner_agent_joins_and_a_killed_rank_resumes_from_the_checkpoint(tmp_path):
    proc = _start(tmp_path, "learner.nnodes=1:2", "train.num_steps=200", "train.checkpoint_every=5",
                  "learner.max_restarts=6")
    agent = None
    try:
        wait_for(lambda: (tmp_path / "tiny" / "join.json").exists() and len(_steps(tmp_path)) >= 1, proc, 300,
                 "the first step")
        cmd = _join(tmp_path)["learner_agent"]
        env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.getcwd()}
        with open(tmp_path / "agent_b.log", "wb") as log:  # node B's agent, started by hand as a user would
            agent = subprocess.Popen([sys.executable, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        learner_log = tmp_path / "tiny" / "logs" / "learner.log"
        wait_for(lambda: "world=2" in learner_log.read_text(errors="replace"), proc, 240, "a 2-node learner group")
        n = len(_steps(tmp_path))
        wait_for(lambda: len(_steps(tmp_path)) >= n + 2, proc, 240, "steps on the 2-node group")
        rank = psutil.Process(agent.pid).children()  # node B's learner rank
        assert len(rank) == 1
        os.kill(rank[0].pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        for p in (proc, agent):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if p is agent else p.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 200 and summary["learner_restarts"] >= 1, summary
    _trained_once(tmp_path, 200, 8)


def test_a_stand_alone_rollout_worker_joins_a_running_job_and_gets_work(tmp_path):
    """The coordinator starts no rollout worker of its own: the run moves only once the stand-alone one joins."""
    proc = _start(tmp_path, "rollout.num_workers=0", "train.num_steps=40")
    worker = None
    try:
        wait_for(lambda: (tmp_path / "tiny" / "join.json").exists(), proc, 300, "the actors to start")
        assert _steps(tmp_path) == []  # nobody generates yet
        cmd = _join(tmp_path)["rollout_worker"]
        assert cmd[0] == "everyprompt-rollout-worker"
        with open(tmp_path / "worker_100.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "actors.rollout_worker", *cmd[1:]], stdout=log,
                                      stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out, err = proc.communicate(timeout=400)
        code = worker.wait(timeout=60)
        assert code == 0, (code, err[-3000:])  # told to shut down with the run
    finally:
        for p in (proc, worker):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "actor.joined" in err and "rollout-100" in err
    summary = json.loads(out.strip().splitlines()[-1])
    done = [line for line in (tmp_path / "worker_100.log").read_text().splitlines() if "rollout.done" in line]
    generated = int(done[-1].split("generated_samples=")[1].split()[0]) if done else 0
    assert generated == summary["generated_samples"] + 2 * 32, (done, summary)  # every RL sample + 2 evals of 32
    _trained_once(tmp_path, 40, 8)
    assert processes_mentioning(str(tmp_path)) == []
