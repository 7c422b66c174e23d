"""``everyprompt-eval`` end to end, as a real subprocess: a run's folder written the way a run writes it (config.yaml,
policy/ exported by export_policy, a checkpoint saved by save_coordinator), then scored on a JSONL task with the
math verifier (math-verify). The policy is a tiny Qwen3-MoE whose attention and expert outputs are zero, so each
next token depends only on the current one: after "=" it says "7", after "7" it stops. Its greedy and sampled
answer to every prompt is "7", and the expected scores follow from the eval set alone."""

import faulthandler
import json
import os
import signal
import subprocess
import sys

import pytest
import structlog
import torch

from configs.load import load, save
from engine.coordinator import checkpoint
from engine.coordinator.eval_cli import main
from engine.data.tasks import build_task
from engine.data.tokenizer import CharTokenizer
from engine.modeling.model import build_model, export_policy, save_model, save_weights
from tests.byo_models import write_jsonl

pytestmark = pytest.mark.timeout(120)

ANSWERS = ["7", "\\frac{14}{2}", "7.0", "8", "\\boxed{3}", "-7"]  # the first three are what the policy says
OVERRIDES = ["task.name=jsonl", "task.num_eval=8", "task.num_dev=2", "reward.plugin=math", "reward.plugin_processes=1"]


def _says_seven(cfg, tok: CharTokenizer):
    """A tiny Qwen3-MoE that answers "7" to any prompt ending in "=" (a bigram model: no attention, no experts)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, seed=0, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    eq, seven = tok.encode("=")[0], tok.encode("7")[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name or name.endswith("embed_tokens.weight") or "lm_head" in name:
                p.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[eq, 0] = emb[seven, 1] = 1.0
        head[seven, 0] = head[tok.eos_id, 1] = 20.0  # after "=": "7"; after "7": eos (logit ~113 against 0)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/tiny/ as a finished run leaves it, plus a checkpoint holding a random-init policy."""
    root = tmp_path_factory.mktemp("eval")
    rows = [{"prompt": f"{i}+{i % 5}=", "answer": ANSWERS[i % len(ANSWERS)]} for i in range(24)]
    data = write_jsonl(root / "data.jsonl", rows)
    run = root / "runs" / "tiny"
    cfg = load([*OVERRIDES, f"task.jsonl_path={data}"], config_name="tiny")
    run.mkdir(parents=True)
    save(cfg, run / "config.yaml")
    tok = CharTokenizer()
    save_model(_says_seven(cfg, tok), root / "init")
    export_policy(str(root / "init"), None, tok, run / "policy")
    random_init = build_model(cfg.model, tok.vocab_size, seed=1, pad_id=tok.pad_id, bos_id=tok.bos_id,
                              eos_id=tok.eos_id)
    save_weights(random_init, run / "weights" / "policy_v2.safetensors")
    staging = checkpoint.staging_dir(run, 2)
    (staging / "learner").mkdir(parents=True)
    checkpoint.save_coordinator(staging, step=2, version=2, extra={},
                                rollouts_state={"inflight": [], "buffer": [], "counts": {}, "sent_version": 2},
                                policy_file=str(run / "weights" / "policy_v2.safetensors"))
    expected = [float(ex.answer in ANSWERS[:3]) for ex in build_task(cfg.task, tok).eval_set]
    return run, data, expected


def _eval(*args):
    """The real command in its own process."""
    argv = [sys.executable, "-m", "engine.coordinator.eval_cli", *map(str, args), "--threads", "1"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=100, env={**os.environ})


def _main(capfd, *args) -> tuple[int, str, str]:
    """The same command's ``main`` in this process (torch is imported already: seconds saved per call); the
    process-wide settings it makes (torch threads, logging, the SIGUSR1 stack dump) are put back after it."""
    threads, log_config = torch.get_num_threads(), structlog.get_config()
    try:
        code = main([*map(str, args), "--threads", "1"])
    except SystemExit as e:  # argparse's errors
        code = e.code
    finally:
        torch.set_num_threads(threads)
        structlog.configure(**log_config)
        faulthandler.unregister(signal.SIGUSR1)
    out, err = capfd.readouterr()
    return code, out, err


def _summary(code: int, out: str, err: str) -> dict:
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_runs_folder_is_scored_greedy_and_pass_at_k(run_dir):
    run, _, expected = run_dir
    assert 0 < sum(expected) < len(expected)  # the eval set holds right and wrong answers for "7"
    proc = _eval(run, "--k", 2, "--samples", 3)
    out = _summary(proc.returncode, proc.stdout, proc.stderr)
    assert out["accuracy"] == pytest.approx(sum(expected) / len(expected)) and out["num_prompts"] == len(expected)
    assert out["pass_at_k"] == pytest.approx(out["accuracy"])  # the samples all say "7" too
    assert out["k"] == 2 and out["num_samples"] == 3 and out["model"] == str(run) and out["task"].startswith("jsonl")
    assert out["verifier"] == "math" and out["invalid_responses"] == 0
    assert "accuracy" in proc.stdout and "pass@2" in proc.stdout  # the table before the JSON line


def test_a_checkpoint_and_a_plain_hf_folder(run_dir, capfd):
    run, data, expected = run_dir
    ckpt = _summary(*_main(capfd, run / "checkpoints", "--k", 0, "--limit", 4))  # the newest: random-init weights
    assert ckpt["weights"].endswith("step_000002/policy.safetensors") and ckpt["pass_at_k"] is None
    assert ckpt["accuracy"] == 0.0 and ckpt["num_prompts"] == 4
    hf = _summary(*_main(capfd, run / "policy", "--config-name", "tiny", "--k", 1, *OVERRIDES,
                         f"task.jsonl_path={data}"))
    assert hf["accuracy"] == pytest.approx(sum(expected) / len(expected))  # the same task, tokenizer and verifier


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capfd):
    run, _, _ = run_dir
    for args, named in (([tmp_path / "nope"], "nope"), ([run, "--bogus"], "--bogus")):  # as a process
        proc = _eval(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr, args
    for args, named in (([tmp_path], "config.json"), ([run, "--k", -1], "--k"), ([run, "--split", "test"], "--split"),
                        ([run, "task.nmu_eval=3"], "task.num_eval"), ([run, "--samples", 1], "--samples")):
        code, _, err = _main(capfd, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, (args, err)


def test_help_explains_every_option():
    proc = _eval("--help")
    assert proc.returncode == 0
    for option in ("--split", "--limit", "--k", "--samples", "--temperature", "--seed", "--batch-size", "--threads",
                   "--config-name", "--config-dir", "overrides"):
        assert option in proc.stdout

