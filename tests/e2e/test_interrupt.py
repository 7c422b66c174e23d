"""Ctrl-C (SIGINT) or SIGTERM on a running job (2 learner ranks): the last completed step is checkpointed, every
child process (workers, torchrun and its ranks) is gone, the exit code is 128 + the signal, metrics.jsonl stays
readable; resume=true from that checkpoint trains every prompt exactly once (marked slow: -m slow runs it)."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from engine.coordinator.checkpoint import checkpoint_dir, latest, verify
from engine.coordinator.metrics import read_metrics
from tests.helpers import processes_mentioning, wait_for

pytestmark = pytest.mark.timeout(600)
GROUPS_PER_STEP = 8  # the tiny preset's train.groups_per_step


def _argv(tmp_path, *overrides):
    return [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path}",
            "progress=false", f"sft.cache_dir={tmp_path / 'sft_cache'}", "learner.num_ranks=2",
            "learner.espo.entropy_scope=batch", "train.checkpoint_every=100000", *overrides]


def _steps(tmp_path) -> list[int]:
    path = tmp_path / "tiny" / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "step" in r] if path.exists() else []


def _interrupt(tmp_path, sig) -> tuple[subprocess.Popen, str, str, float]:
    """A run with no periodic checkpoint, sent ``sig`` after its third step; returns it once it exited, its
    stdout and stderr, and the seconds from the signal to its exit."""
    proc = subprocess.Popen(_argv(tmp_path, "train.num_steps=1000"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(_steps(tmp_path)) >= 3, proc, 420, "step 3", poll_s=0.05)
        assert len(processes_mentioning(str(tmp_path))) >= 6  # coordinator, rollout, reward, torchrun, 2 ranks
        proc.send_signal(sig)
        t0 = time.monotonic()
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it is stuck: engine/log.py dumps every thread on SIGUSR1
            proc.send_signal(signal.SIGUSR1)
            time.sleep(3)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"no exit 120 s after {sig.name}; its threads:\n{err[-6000:]}") from None
        return proc, out, err, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()


def _assert_no_orphans(tmp_path) -> None:
    deadline = time.monotonic() + 60  # torchrun and its ranks exit after the coordinator; slow on a loaded box
    while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(tmp_path)) == [], "orphaned child processes after the signal"


def _assert_checkpointed(tmp_path, proc, out, err, sig, seconds) -> int:
    """Exit 128 + sig, no orphans, a complete checkpoint of the last step in metrics.jsonl (at least 3)."""
    assert proc.returncode == 128 + sig, err[-3000:]
    _assert_no_orphans(tmp_path)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["signal"] == sig.name, summary
    step = summary["checkpoint_step"]
    steps = _steps(tmp_path)
    assert step is not None and step >= 3 and step == steps[-1], (summary, steps)  # no finished step lost
    assert int(verify(checkpoint_dir(tmp_path / "tiny", step))["step"]) == step  # complete: manifest matches
    assert latest(tmp_path / "tiny").step == step
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["checkpoint_step"] == step
    assert '"event": "run.interrupted"' in err or "run.interrupted" in err
    print(f"{sig.name}: exit {proc.returncode} {seconds:.1f} s after the signal, checkpoint at step {step}")
    return step


def test_ctrl_c_checkpoints_the_last_step_and_stops_every_child(tmp_path):
    proc, out, err, seconds = _interrupt(tmp_path, signal.SIGINT)  # what a terminal's Ctrl-C sends
    _assert_checkpointed(tmp_path, proc, out, err, signal.SIGINT, seconds)
    rows = read_metrics(tmp_path / "tiny" / "metrics.jsonl")
    assert all(isinstance(r, dict) for r in rows)


def test_sigterm_checkpoints_the_last_step_and_stops_every_child(tmp_path):
    proc, out, err, seconds = _interrupt(tmp_path, signal.SIGTERM)  # what a cluster scheduler sends first
    _assert_checkpointed(tmp_path, proc, out, err, signal.SIGTERM, seconds)


@pytest.mark.slow  # a third run and a resume: about 60 s more on 2 loaded cores
def test_resume_after_sigterm_trains_every_prompt_exactly_once(tmp_path):
    proc, out, err, seconds = _interrupt(tmp_path, signal.SIGTERM)
    step = _assert_checkpointed(tmp_path, proc, out, err, signal.SIGTERM, seconds)

    steps = step + 2
    resumed = subprocess.Popen(_argv(tmp_path, f"train.num_steps={steps}", "resume=true"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        out, err = resumed.communicate(timeout=420)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == steps and summary["resumed_from_step"] == step and summary["discarded_samples"] == 0
    ledger = read_metrics(tmp_path / "tiny" / "prompts.jsonl")
    assert _steps(tmp_path) == [r["step"] for r in ledger] == list(range(1, steps + 1))  # none missing or twice
    stream = range(1_000_000, 1_000_000 + steps * GROUPS_PER_STEP)  # the training stream's first prompt ids
    assert Counter(pid for r in ledger for pid in r["prompt_ids"]) == Counter(stream)  # each exactly once
