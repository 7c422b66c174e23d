"""A whole training run on the sglang backend (each of two rollout workers launches its own server: the stand-in,
tests/sglang_standin.py, as ``python -m sglang.launch_server``), with one worker SIGKILLed mid-run: its server goes
with it (it would hold the port its replacement needs), the worker is restarted with a new server, the responses
it was generating continue on the other worker from the tokens the coordinator had received, and every step
trains with the staleness bound held and nothing left behind."""

import json
import os
import signal
import subprocess
import sys

import pytest

from bench.chaos_faults import free_port_pair
from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning, wait_for
from tests.sglang_standin import fake_sglang_env

pytestmark = pytest.mark.timeout(420)
STEPS = 16


def _pids(tmp_path, needle: str) -> list[int]:
    out = []
    for pid in processes_mentioning(str(tmp_path)):
        try:
            if needle in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                out.append(pid)
        except OSError:
            pass
    return out


def _streaming(port: int) -> int:
    """The most tokens any request has so far among those worker 1's server (the stand-in) is streaming now."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_progress", timeout=5) as resp:
            return max(json.loads(resp.read())["live"].values(), default=0)
    except OSError:
        return 0


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_killed_sglang_worker_takes_its_server_and_its_responses_continue_elsewhere(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", f"train.num_steps={STEPS}",
            "rollout.backend=sglang", f"rollout.sglang_python={sys.executable}",
            f"rollout.sglang_port={free_port_pair()}", "rollout.num_workers=2", "rollout.chunk_tokens=4",
            "task.max_answer_tokens=160",
            "rollout.return_routes=false", "learner.router_replay=off", "rollout.sglang_health_interval_s=0.5",
            "transport.heartbeat_s=0.5", "transport.peer_timeout_s=5"]
    env = {**os.environ, **fake_sglang_env(tmp_path)}
    err_path = tmp_path / "coordinator.stderr"
    with open(err_path, "w") as err_file:  # a file, not a pipe nobody reads until the end
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
    metrics = tmp_path / "tiny" / "metrics.jsonl"

    def steps():
        return [r for r in read_metrics(metrics) if "step" in r] if metrics.exists() else []

    try:
        wait_for(lambda: len(steps()) >= 2 and len(_pids(tmp_path, "sglang.launch_server")) == 2, proc, 300,
                 "two steps on two launched servers")
        port = int(next(a for a in argv if a.startswith("rollout.sglang_port=")).split("=")[1]) + 1
        wait_for(lambda: _streaming(port) >= 8, proc, 120, "worker 1 streaming responses")  # mid-response
        worker = [p for p in _pids(tmp_path, "actors.rollout_worker")
                  if "--worker-id 1" in open(f"/proc/{p}/cmdline", "rb").read().decode().replace("\0", " ")]
        assert len(worker) == 1, worker
        its_server = [p for p in _pids(tmp_path, "sglang.launch_server") if _ppid(p) == worker[0]]
        assert len(its_server) == 1, its_server
        os.kill(worker[0], signal.SIGKILL)  # the worker only: its server is left to the coordinator to clean up
        n = len(steps())
        wait_for(lambda: len(steps()) >= n + 2 and steps()[-1]["actor_restarts"] >= 1, proc, 240,
                 "steps after the rollout worker restart")
        # the killed worker's server went with it (it would hold the port its replacement needs)
        wait_for(lambda: its_server[0] not in _pids(tmp_path, "sglang.launch_server"), proc, 60,
                 "the killed worker's server to go")
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == STEPS
    rows = steps()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    last = rows[-1]
    assert last["actor_restarts"] == 1 and "rollout-1" in err and "actor.restarting" in err
    joined = [line for line in err.splitlines() if "actor.joined" in line and "name=rollout-1" in line]
    assert len(joined) == 2, joined  # the replacement, on a server of its own on the same port, joined
    # its unfinished responses were sent again from what had streamed: a non-empty prefix kept for some
    assert last["continued_samples"] >= 1 and last["continued_prefix_tokens"] >= 1, last
    assert max(r["version_lag_max"] for r in rows) <= 1 and last["discarded_samples"] == 0
    assert processes_mentioning(str(tmp_path)) == []
