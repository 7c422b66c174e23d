"""A whole training run with rollout.weight_sync=distributed on the sglang backend: each of two rollout workers
launches its own server (the stand-in, tests/sglang_standin.py, as ``python -m sglang.launch_server``), and every
new version reaches them as a gloo broadcast from learner rank 0 (actors/weight_sync.py), one group per server,
with no policy file read by any worker."""

import json
import os
import re
import subprocess
import sys

import pytest

from bench.chaos_faults import free_port_pair
from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning
from tests.sglang_standin import fake_sglang_env

pytestmark = pytest.mark.timeout(300)
STEPS = 4


def test_versions_reach_sglang_servers_by_broadcast_only(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", f"train.num_steps={STEPS}",
            "rollout.backend=sglang", "rollout.weight_sync=distributed", f"rollout.sglang_python={sys.executable}",
            f"rollout.sglang_port={free_port_pair()}", "rollout.num_workers=2", "task.max_answer_tokens=48",
            "rollout.return_routes=false", "learner.router_replay=off", "rollout.sglang_health_interval_s=0.5"]
    env = {**os.environ, **fake_sglang_env(tmp_path)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == STEPS
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "step" in r]
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))
    logs = tmp_path / "tiny" / "logs"
    learner = (logs / "learner.log").read_text()
    broadcast = {int(v) for v in re.findall(r"weights\.broadcast\b.*?version=(\d+)", learner)}
    assert broadcast and max(broadcast) >= STEPS - 1, learner[-2000:]
    for i in range(2):
        worker = (logs / f"rollout-{i}.log").read_text()
        # its server took versions over the group and never from a file
        assert "POST /init_weights_update_group" in worker and "POST /update_weights_from_distributed" in worker
        assert "POST /update_weights_from_disk" not in worker, worker[-2000:]
        received = [int(v) for v in re.findall(r"sglang\.weights_received\b.*?version=(\d+)", worker)]
        assert received and received == sorted(received) and received[-1] >= 1, worker[-2000:]
        assert worker.count("POST /init_weights_update_group") == 1  # one group per server, kept
    assert max(r["version_lag_max"] for r in rows) <= 1
    assert processes_mentioning(str(tmp_path)) == []
