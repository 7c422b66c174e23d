"""Bring your own model and data: a tiny Qwen2-MoE (shared experts) built locally with its own BPE tokenizer and a
non-ASCII JSONL task trains end to end; runs/<name>/policy/ loads back with AutoModelForCausalLM; the run's
checkpoints survive a forgotten resume=true, and a resume with a changed model names the key."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.byo_models import make_model, make_tokenizer, unicode_rows, write_jsonl

pytestmark = pytest.mark.timeout(240)


def _train(tmp_path, *overrides):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path / 'runs'}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "task.name=jsonl",
            f"task.jsonl_path={tmp_path / 'data.jsonl'}", "task.num_eval=8", "task.num_dev=4", *overrides]
    return subprocess.run(argv, capture_output=True, text=True, timeout=220, env={**os.environ})


def test_qwen2_moe_with_its_own_tokenizer_trains_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = unicode_rows(48)
    write_jsonl(tmp_path / "data.jsonl", rows)
    tok = make_tokenizer([r["prompt"] + " " + r["answer"] for r in rows], tmp_path / "tok")
    model_dir = make_model("qwen2_moe", tmp_path / "qwen2_moe", tok)
    proc = _train(tmp_path, f"model.init_from={model_dir}", "train.checkpoint_every=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["sft_s"] == 0.0  # SFT skipped for init_from
    assert "sft skipped" in proc.stderr
    run_dir = tmp_path / "runs" / "tiny"
    rows_m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["route_bytes_per_token"] > 0 for r in rows_m if "step" in r)  # routes recorded (R3)

    policy = summary["policy_dir"]
    assert policy == str(run_dir / "policy")
    trained = AutoModelForCausalLM.from_pretrained(policy)
    assert type(trained).__name__ == "Qwen2MoeForCausalLM"
    assert trained.config.eos_token_id == tok.eos_token_id
    assert AutoTokenizer.from_pretrained(policy).encode("東京 café") == tok.encode("東京 café")
    last = load_file(str(run_dir / "weights" / "policy_v3.safetensors"))  # what the learner published last
    own = trained.state_dict()
    assert last.keys() == own.keys() and all(torch.equal(last[k], own[k]) for k in last)
    assert (run_dir / "policy" / "generation_config.json").exists()

    saved = (run_dir / "config.yaml").read_text()
    again = _train(tmp_path, f"model.init_from={model_dir}")  # resume=true forgotten
    assert again.returncode == 2 and "resume=true" in again.stderr and "overwrite=true" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert any((run_dir / "checkpoints").iterdir()) and (run_dir / "policy" / "config.json").exists()
    assert any((run_dir / "logs").iterdir())  # the first attempt's logs are still there
    changed = _train(tmp_path, f"model.init_from={tmp_path / 'tok'}", "resume=true")
    assert changed.returncode == 2 and "model.init_from" in changed.stderr, changed.stderr
    assert (run_dir / "config.yaml").read_text() == saved  # the saved config is kept
