"""Each built-in reasoning task through the real pipeline on the tiny config (SFT on worked solutions, RL with the
task's final-answer verifier as the reward plugin). Slow: ``pytest -m slow tests/e2e/test_reasoning_tasks_e2e.py``."""

import json
import os
import subprocess
import sys

import pytest

from configs.load import load_resolved
from engine.coordinator.metrics import read_metrics
from engine.data.tasks import reasoning_limit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("name", ["scratchpad", "countdown", "sorting"])
def test_reasoning_task_trains_end_to_end(tmp_path, name):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", f"task.name={name}", "task.max_level=3",
            "train.num_steps=2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=580, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["eval_accuracy_end"] <= 1.0
    cfg = load_resolved(tmp_path / "tiny" / "config.yaml")
    assert cfg.reward.plugin == f"engine.rewards.reasoning_verifiers:{name}"
    assert cfg.task.max_answer_tokens == reasoning_limit(name, 3, cfg.task.seed)  # from the longest worked solution
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and r["valid_frac"] == 1.0  # the verifier judged every response
        assert 1 <= r["mean_response_tokens"] <= r["p99_response_tokens"] <= cfg.task.max_answer_tokens
