"""Every bad input is refused before anything starts: exit 2, one ``config error`` line, in seconds, and nothing
of an earlier run deleted (engine/coordinator/preflight.py)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from engine.coordinator.cli import rotate_logs
from tests.byo_models import make_model, make_tokenizer, write_jsonl

pytestmark = pytest.mark.timeout(120)


def _cli(tmp_path, *overrides):
    argv = [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path / 'runs'}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", *overrides]
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ})
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An earlier run's state, a good data file, a broken model folder and a tokenizer bigger than its model."""
    d = tmp_path_factory.mktemp("inputs")
    write_jsonl(d / "good.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)])
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    write_jsonl(d / "no_answer.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    (d / "broken").mkdir()
    (d / "broken" / "config.json").write_text("{not json")
    (d / "unknown").mkdir()
    (d / "unknown" / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    tok = make_tokenizer(["small data for a tokenizer"] * 4, d / "tok")
    small = make_model("llama", d / "small_vocab", tok)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 8}))
    return d


def _bad_inputs(d):
    return {
        "missing model": ([f"model.init_from={d / 'nope'}"], "model.init_from="),
        "broken config.json": ([f"model.init_from={d / 'broken'}"], "config.json does not parse"),
        "unknown architecture": ([f"model.init_from={d / 'unknown'}"], "not a model transformers knows"),
        "vocab mismatch": ([f"model.init_from={d / 'small_vocab'}"], "vocab_size is 8"),
        "missing data": (["task.name=jsonl", f"task.jsonl_path={d / 'nope.jsonl'}"], "no such file"),
        "bad encoding": (["task.name=jsonl", f"task.jsonl_path={d / 'latin1.jsonl'}"], "latin1.jsonl:2: not UTF-8"),
        "missing field": (["task.name=jsonl", f"task.jsonl_path={d / 'no_answer.jsonl'}"], "no_answer.jsonl:2"),
        "plugin": (["reward.plugin=nonexistent:fn"], "cannot import"),
        "out_dir a file": ([f"out_dir={d / 'good.jsonl'}"], "is a file"),
    }


CASES = ["missing model", "broken config.json", "unknown architecture", "vocab mismatch", "missing data",
         "bad encoding", "missing field", "plugin", "out_dir a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(tmp_path, inputs, case):
    overrides, expected = _bad_inputs(inputs)[case]
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints" / "step_3").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_3" / "meta.json").write_text("{}")
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "rollout-0.log").write_text("earlier attempt")
    proc, _ = _cli(tmp_path, "overwrite=true", *overrides)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("everyprompt-train: config error: ") and expected in lines[0], lines[0]
    # before any work: no SFT started (its cache stays empty), no actor launched (no new log)
    assert not any((tmp_path / "sft_cache").glob("*")) and sorted(p.name for p in (run_dir / "logs").iterdir()) == [
        "rollout-0.log"]
    assert (run_dir / "checkpoints" / "step_3" / "meta.json").exists()  # nothing deleted
    assert (run_dir / "logs" / "rollout-0.log").read_text() == "earlier attempt"


def test_busy_port_and_existing_checkpoints_are_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc, _ = _cli(tmp_path, f"transport.port={s.getsockname()[1]}")
    assert proc.returncode == 2 and "cannot bind" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "runs" / "tiny" / "checkpoints" / "step_5").mkdir(parents=True)
    proc, _ = _cli(tmp_path)
    assert proc.returncode == 2 and "resume=true" in proc.stderr and "overwrite=true" in proc.stderr
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step_5").is_dir()
    proc, _ = _cli(tmp_path, "resume=true")  # no complete checkpoint to resume from
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_logs_of_earlier_attempts_are_rotated_not_deleted(tmp_path):
    logs = tmp_path / "logs"
    assert rotate_logs(logs) is None
    for attempt in ("first", "second"):
        logs.mkdir(exist_ok=True)
        (logs / "learner.log").write_text(attempt)
        rotate_logs(logs)
    assert (logs / "attempt-1" / "learner.log").read_text() == "first"
    assert (logs / "attempt-2" / "learner.log").read_text() == "second"
    assert not (logs / "learner.log").exists()
