"""Ctrl-C on a running job (2 learner ranks): every child process (workers, torchrun and its ranks) is gone, and
metrics.jsonl stays readable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.metrics import read_metrics

pytestmark = pytest.mark.timeout(300)


def _processes_mentioning(text: str) -> list[int]:
    """Our own descendants are found by the unique tmp path on their command line (never by process name, never guessing)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_ctrl_c_stops_every_child_and_keeps_metrics(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "train.num_steps=1000", "learner.num_ranks=2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any("step" in r for r in read_metrics(metrics)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert len(_processes_mentioning(str(tmp_path))) >= 6  # coordinator, rollout, reward, torchrun and its 2 ranks
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == [], "orphaned child processes after Ctrl-C"
    rows = read_metrics(metrics)
    assert any("step" in r for r in rows) and all(isinstance(r, dict) for r in rows)
    assert '"status": "interrupted"' in out.strip().splitlines()[-1]
