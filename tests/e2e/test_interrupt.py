"""Ctrl-C on a running job (2 learner ranks): every child process (workers, torchrun and its ranks) is gone, and
metrics.jsonl stays readable."""

import signal
import subprocess
import sys
import time

import pytest

from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.timeout(600)


def test_ctrl_c_stops_every_child_and_keeps_metrics(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "train.num_steps=1000", "learner.num_ranks=2",
            "learner.espo.entropy_scope=batch"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any("step" in r for r in read_metrics(metrics)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert len(processes_mentioning(str(tmp_path))) >= 6  # coordinator, rollout, reward, torchrun and its 2 ranks
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it is stuck: engine/log.py dumps every thread on SIGUSR1
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"no exit 120 s after SIGINT; its threads:\n{err[-6000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    deadline = time.monotonic() + 60  # torchrun and its ranks exit after the coordinator; slow on a loaded box
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == [], "orphaned child processes after Ctrl-C"
    rows = read_metrics(metrics)
    assert any("step" in r for r in rows) and all(isinstance(r, dict) for r in rows)
    assert '"status": "interrupted"' in out.strip().splitlines()[-1]
