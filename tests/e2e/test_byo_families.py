"""Every common MoE family and two dense ones, tiny and random-init, each saved with its own BPE tokenizer:
``everyprompt-train model.init_from=<dir> task.name=jsonl`` trains, MoE runs record routes and replay them (the
learner's rollout-vs-trainer log-prob gap stays at fp32 noise), dense runs turn replay off with one warning, and
runs/<name>/policy/ loads back with AutoModelForCausalLM as the same architecture. The default run covers one
MoE family with dense layers and a dense model; ``-m slow`` covers the other five."""

import json
import os
import subprocess
import sys

import pytest

from tests.byo_models import DENSE_FAMILIES, MOE_FAMILIES, make_model, make_tokenizer, unicode_rows, write_jsonl

pytestmark = pytest.mark.timeout(300)
DEFAULT = {"deepseek_v3", "llama"}
FAMILIES = [pytest.param(f, marks=() if f in DEFAULT else pytest.mark.slow) for f in (*MOE_FAMILIES, *DENSE_FAMILIES)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_replays_its_routes_and_exports(tmp_path, family):
    from transformers import AutoModelForCausalLM

    rows = unicode_rows(48)
    write_jsonl(tmp_path / "data.jsonl", rows)
    tok = make_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], tmp_path / "tok")
    model_dir = make_model(family, tmp_path / family, tok)
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path / 'runs'}",
            "progress=false", "task.name=jsonl", f"task.jsonl_path={tmp_path / 'data.jsonl'}", "task.num_eval=8",
            "task.num_dev=4", f"model.init_from={model_dir}", "train.num_steps=2", "learner.gap_probe_seqs=16",
            "learner.gap_probe_every=1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = tmp_path / "runs" / "tiny"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r]
    assert len(steps) == 2
    if family in MOE_FAMILIES:
        assert all(r["route_bytes_per_token"] > 0 for r in steps)  # routes recorded and replayed (R3)
        assert max(r["logprob_gap_max"] for r in steps) < 1e-4, [r["logprob_gap_max"] for r in steps]
    else:
        assert "router_replay.off" in proc.stderr and "dense model" in proc.stderr
        assert all(r["route_bytes_per_token"] == 0 for r in steps)
    trained = AutoModelForCausalLM.from_pretrained(summary["policy_dir"])
    assert trained.config.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]
