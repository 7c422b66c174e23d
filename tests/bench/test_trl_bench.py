"""``everyprompt-bench trl``: TRL is optional and imported lazily; with it installed, a tiny run returns the keys.

Each check is a real subprocess (``python -m bench.cli trl ...``); TRL's absence is simulated with
``sys.modules['trl'] = None``, which makes ``import trl`` fail as a missing package does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in its own session; past ``timeout`` the whole session (the bench, its TRL process, the
    everyprompt run and its actors) gets SIGINT, then SIGKILL, and the test fails naming the timeout."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.communicate(timeout=wait_s)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
        pytest.fail(f"the bench did not finish within {timeout:.0f} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_help_works_without_trl():
    proc = _bench("import sys; sys.modules['trl'] = None\n"
                  "from bench.cli import main; sys.exit(main(['trl', '--help']))")
    assert proc.returncode == 0, proc.stderr
    assert "--completions" in proc.stdout and "--budget-s" in proc.stdout
    assert "everyprompt[trl]" in proc.stdout


def test_missing_trl_is_one_clear_line():
    proc = _bench("import sys; sys.modules['trl'] = None\n"
                  "from bench.cli import main; sys.exit(main(['trl', '--completions', '16', '--budget-s', '1']))")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pip install 'everyprompt[trl]'" in lines[0] and "TRL is not installed" in lines[0]
    assert proc.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed (pip install 'everyprompt[trl]'): the tiny side-by-side run needs it")
def test_tiny_run_returns_the_keys(tmp_path):
    """Both sides really train (the tiny preset's model, from its own cached SFT start), 2 steps each."""
    args = ["trl", "--completions", "16", "--group-size", "4", "--steps", "2", "--budget-s", "0",
            "--eval-every", "1", "--out-dir", str(tmp_path / "runs"), "--sft-cache", str(tmp_path / "sft"),
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.num_experts=4", "model.top_k=2", "model.moe_intermediate_size=32",
            "task.max_digits=2", "task.num_eval=16", "task.num_dev=16", "sft.max_steps=10", "sft.batch_size=16",
            "sft.eval_every=10", "sft.target_accuracy=1.0", "reward.plugin_processes=1"]
    proc = _bench(f"import sys; from bench.cli import main; sys.exit(main({args!r}))", timeout=85)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bench"] == "trl"
    assert set(out["ratio_e2e_tokens_per_s"]) == {"16", "best_vs_best"}
    assert out["ratio_e2e_tokens_per_s"]["16"] > 0
    assert set(out["ratio_time_to_gain"]) == {"16", "best_vs_best"}
    for key in ("16", "best_vs_best"):  # a number, or null with the reason
        assert out["ratio_time_to_gain"][key] is not None or out["time_to_gain_reasons"][key]
    sides = out["settings"]["16"]
    assert sides["trl"][0]["steps"] == 2 and sides["ours"][0]["steps"] == 2
    assert sides["trl"][0]["acc_start"] == pytest.approx(sides["ours"][0]["acc_start"])  # same weights, same eval
