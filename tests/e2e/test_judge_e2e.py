"""The built-in training run with the generative judge, through configuration alone (reward.plugin=judge): every
group goes to the judge (the tiny initial policy, served by the rollout decode loop), and unparseable verdicts are
recorded as failures, never a crash."""

import json
import os
import subprocess
import sys

import pytest

from engine.coordinator.metrics import read_metrics

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # ~30-50 s: SFT + 3 RL steps + judge


def test_tiny_run_trains_with_the_generative_judge(tmp_path):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "reward.plugin=judge",
            "reward.judge.max_calls_per_group=5"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 3
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["judge_calls_per_group"] == 5  # the budget (6 pairs in a group of 4)
        assert 0 <= r["judge_parse_failures_per_group"] <= 5 and r["judge_error_per_group"] == 0
        if r["judge_parse_failures_per_group"] == 5:  # nothing parsed: no response is valid, no gradient
            assert r["valid_frac"] == 0.0
