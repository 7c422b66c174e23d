"""The product claim, checked: the default run (SFT from scratch, then async RL) visibly learns.
Marked slow (about 3-4 minutes on 2 cores): run it with `python -m pytest -m slow`."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_default_run_gains_at_least_015_heldout_accuracy(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", f"out_dir={tmp_path}", "progress=false",
            f"sft.cache_dir={tmp_path / 'sft_cache'}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval_accuracy_end"] - summary["eval_accuracy_start"] >= 0.15, summary
