"""The real pipeline, end to end, on the tiny config: coordinator, rollout/reward worker processes over loopback
ZeroMQ, and the DeepSpeed learner under torchrun."""

import json
import math
import os
import subprocess
import sys

import pytest

from configs.load import load_resolved
from engine.coordinator.metrics import read_metrics

pytestmark = pytest.mark.timeout(420)


def _train(tmp_path, *overrides):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", *overrides]
    return subprocess.run(argv, capture_output=True, text=True, timeout=400, env={**os.environ})


def test_tiny_run_writes_sane_outputs(tmp_path):
    proc = _train(tmp_path, "learner.gap_probe_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert 0.0 <= summary["eval_accuracy_start"] <= 1.0 and 0.0 <= summary["eval_accuracy_end"] <= 1.0
    run_dir = tmp_path / "tiny"
    assert load_resolved(run_dir / "config.yaml").train.num_steps == 3
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["version"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["zero_variance_rate"] <= 1.0
        assert 0 <= r["version_lag_max"] <= 1  # train.max_policy_lag=1 holds per token
        assert math.isfinite(r["loss"]) and 0.0 <= r["clip_frac"] <= 1.0
        assert r["num_samples"] == 8 * 4 and r["gen_tokens_per_s"] >= 0
        assert r["routed_frac"] == 1.0 and r["route_bytes_per_token"] > 0  # routes recorded and replayed (R3)
        # every step (gap_probe_every=1), the trainer recomputes probed tokens under the weights that sampled them (fp32: no gap)
        assert r["logprob_gap_tokens"] > 0 and r["logprob_gap_mean"] < 1e-3 and r["logprob_gap_off_mean"] < 1e-3
        assert r["routing_mismatch_frac"] < 0.05
    assert (run_dir / "report.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["learner.log", "reward-0.log", "rollout-0.log"]


def test_user_jsonl_dataset_runs_end_to_end(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}*2=", "answer": str(2 * a)}) + "\n" for a in range(120)))
    proc = _train(tmp_path, "task.name=jsonl", f"task.jsonl_path={data}", "train.num_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0.0 <= summary["eval_accuracy_end"] <= 1.0
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "step" in r]
    assert [r["version"] for r in rows] == [1, 2]


def test_every_zero_variance_stage_runs_end_to_end(tmp_path):
    """Offline filter -> filtered pool -> adaptive N, top-ups, shaped rewards, RL-ZVP and the variance buffer."""
    pool = tmp_path / "pool.jsonl"
    proc = subprocess.run([sys.executable, "-m", "engine.data.pool", "--out", str(pool), "--pool-size", "200",
                           "--config-name", "tiny", f"sft.cache_dir={tmp_path / 'sft_cache'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["kept"] + stats["dropped_solved"] + stats["dropped_unsolved"] == stats["pool"] > 0
    proc = _train(tmp_path, f"task.train_pool={pool}", "rollout.adaptive_group_size=true", "rollout.top_up=4",
                  "reward.graded=true", "reward.overlong_coef=0.5", "reward.repetition_coef=0.5",
                  "learner.rl_zvp_alpha=0.1", "train.buffer_order=variance", "train.num_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if "step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    pool_ids = {1_000_000 + i for i in range(stats["kept"])}
    trained = [p for r in read_metrics(tmp_path / "tiny" / "prompts.jsonl") for p in r["prompt_ids"]]
    assert set(trained) <= pool_ids  # RL prompts come from the filtered pool only
    for r in rows:
        assert r["zv_rate_final"] == 0.0 and r["wasted_sample_frac"] == 0.0  # RL-ZVP: every group has gradient
        assert r["zv_rate_shaped"] <= r["zv_rate_raw"] and r["group_size_mean"] >= 4
        assert r["buffer_priority_taken"] >= r["buffer_priority_min"]
