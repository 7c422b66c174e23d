"""Disk faults, injected for real: a file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG), EIO raised by
an audit hook on the Nth ``open`` (both in a forked child, so the test process is untouched), and a tiny tmpfs
filled up (ENOSPC; skipped where mounting is not permitted). A checkpoint hit by one is dropped with
``checkpoint.write_failed`` naming the path and the cause, the previous one stays the newest and verifies, and
the next save succeeds; a weight version hit by one raises an OSError naming the path, and leaves the previous
version's file whole and no temporary file (docs/guides/reliability.md, "Disk faults")."""

import asyncio
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.backends.weights_file import digest_file
from engine.coordinator import checkpoint
from engine.coordinator.buffer import Group
from engine.coordinator.loop import _checkpoint, _save_on_interrupt
from engine.coordinator.batch import RunStats
from engine.coordinator.recovery import Interrupts
from engine.modeling.model import disk_error, publish_state, save_state
from transport.messages import CheckpointSaved


def _in_child(fn, *, fsize: int | None = None, eio_open: str | None = None):
    """``fn()`` in a forked child under a real fault: writes past ``fsize`` bytes fail (EFBIG, SIGXFSZ ignored),
    or the first ``open`` for writing of a path containing ``eio_open`` fails with EIO. Returns ("ok", value) or
    ("err", errno, strerror, filename)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(r)
        try:
            if fsize is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            if eio_open is not None:
                def hook(event, args, armed=[True]):
                    if event == "open" and armed[0] and eio_open in str(args[0]) and args[1] and \
                            any(c in str(args[1]) for c in "wax+"):
                        armed[0] = False
                        raise OSError(errno.EIO, os.strerror(errno.EIO), str(args[0]))  # as open() names it
                sys.addaudithook(hook)
            out = ["ok", fn()]
        except OSError as e:
            out = ["err", e.errno, e.strerror, e.filename]
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = ["err", None, f"{type(e).__name__}: {e}", None]
        os.write(w, json.dumps(out, default=str).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs (a disk that fills up for real); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(disk) -> None:
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


class _Learner:
    """Stands in for learner rank 0 (the real one is in tests/actors/test_learner_disk_faults.py): writes a
    learner folder of ``size`` bytes, answering as ``LearnerRank.save`` does."""

    def __init__(self, size: int = 4096):
        self.size = size

    async def checkpoint(self, step: int, path: str) -> CheckpointSaved:
        try:
            os.makedirs(f"{path}/state", exist_ok=True)
            with open(f"{path}/state/model_states.pt", "wb") as f:
                f.write(os.urandom(self.size))
        except OSError:
            return CheckpointSaved(step=step, path="")
        return CheckpointSaved(step=step, path=path)


def _actors(learner=None):
    g = Group(group_id="g", prompt_id=1, prompt_ids=np.arange(3, dtype=np.int32), answer="1", num_samples=2,
              temperature=1.0)
    state = {"inflight": [g], "buffer": [], "counts": {"prompts_taken": 1}, "sent_version": 1}
    return types.SimpleNamespace(learner=learner or _Learner(), rollouts=types.SimpleNamespace(state=lambda: state))


def _run_with_policy(root, policy_bytes: int = 1024):
    (root / "weights").mkdir(parents=True, exist_ok=True)
    for v in (3, 6, 9):
        (root / "weights" / f"policy_v{v}.safetensors").write_bytes(os.urandom(policy_bytes))
    return root


def _save(run_dir, step, a=None):
    return asyncio.run(_checkpoint(a or _actors(), run_dir, step, step, RunStats(), {"accuracy": 0.0},
                                   Interrupts(60)))


def _assert_previous_intact(run_dir, step):
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None and ckpt.step == step
    checkpoint.verify(ckpt.path)
    assert checkpoint.load_coordinator(ckpt)["counts"] == {"prompts_taken": 1}
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.path.name
    assert not list((run_dir / "checkpoints").glob(".staging_*")), "the failed save's staging folder is left"


def test_efbig_while_saving_drops_the_checkpoint_and_the_next_save_succeeds(tmp_path, capfd):
    run_dir = _run_with_policy(tmp_path, policy_bytes=64 << 10)
    assert _save(run_dir, 3) == checkpoint.checkpoint_dir(run_dir, 3)
    assert _in_child(lambda: _save(run_dir, 6), fsize=16 << 10) == ["ok", None]  # the 64 KiB policy copy fails
    out = capfd.readouterr().out
    assert "checkpoint.write_failed" in out and "File too large" in out and ".staging_step_000006" in out
    _assert_previous_intact(run_dir, 3)
    assert _save(run_dir, 9) == checkpoint.checkpoint_dir(run_dir, 9)  # transient: the next checkpoint is written
    assert checkpoint.latest(run_dir).step == 9


def test_eio_on_one_file_raises_naming_it_and_removes_the_staging_folder(tmp_path):
    run_dir = _run_with_policy(tmp_path)
    _save(run_dir, 3)

    def save_6():
        path = checkpoint.staging_dir(run_dir, 6)
        asyncio.run(_Learner().checkpoint(6, str(path / "learner")))
        checkpoint.save_coordinator(path, step=6, version=6, rollouts_state=_actors().rollouts.state(), extra={},
                                    policy_file=str(run_dir / "weights" / "policy_v6.safetensors"))

    err = _in_child(save_6, eio_open="coordinator.json")
    assert err[:3] == ["err", errno.EIO, "Input/output error"] and err[3].endswith("coordinator.json")
    _assert_previous_intact(run_dir, 3)


def test_a_learner_that_could_not_write_its_shards_drops_the_checkpoint(tmp_path, capfd):
    run_dir = _run_with_policy(tmp_path)
    _save(run_dir, 3)
    assert _in_child(lambda: _save(run_dir, 6, _actors(_Learner(size=64 << 10))), fsize=16 << 10) == ["ok", None]
    out = capfd.readouterr().out
    assert "checkpoint.write_failed" in out and "learner" in out
    _assert_previous_intact(run_dir, 3)


def test_a_full_disk_drops_the_checkpoint_until_there_is_room_again(tiny_disk, capfd):
    run_dir = _run_with_policy(tiny_disk / "run", policy_bytes=8 << 10)
    _save(run_dir, 3)
    _fill(tiny_disk)
    assert _save(run_dir, 6) is None
    out = capfd.readouterr().out
    assert "checkpoint.write_failed" in out and "No space left on device" in out
    _assert_previous_intact(run_dir, 3)
    (tiny_disk / "filler").unlink()
    assert _save(run_dir, 9) == checkpoint.checkpoint_dir(run_dir, 9)


def test_an_interrupt_checkpoint_that_fails_names_the_previous_one(tiny_disk):
    run_dir = _run_with_policy(tiny_disk / "run", policy_bytes=8 << 10)
    _save(run_dir, 3)
    _fill(tiny_disk)
    interrupts = Interrupts(60)
    saved = asyncio.run(_save_on_interrupt(_actors(), run_dir, 6, 6, RunStats(), {"accuracy": 0.0}, interrupts))
    assert saved.step == 3  # resume=true continues from it; the run still exits 130/143 (cli.py)
    assert "could not be written" in interrupts.aborted  # summary.json: save_abandoned
    _assert_previous_intact(run_dir, 3)


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))}  # 64 KiB


def _assert_only_version(weights, path, digest):
    assert sorted(p.name for p in weights.iterdir()) == [path.name], "a temporary file is left"
    assert digest_file(path) == digest  # the previous version, whole: what the workers keep serving
    assert torch.equal(load_file(str(path))["w"], _state(1)["w"])


def test_a_weight_version_past_the_file_size_limit_raises_naming_it(tmp_path):
    weights = tmp_path / "weights"
    v1 = weights / "policy_v1.safetensors"
    digest = save_state(_state(1), v1)
    v2 = weights / "policy_v2.safetensors"
    err = _in_child(lambda: save_state(_state(2), v2), fsize=16 << 10)
    assert err == ["err", errno.EFBIG, "File too large", str(v2)]
    _assert_only_version(weights, v1, digest)


def test_a_weight_version_on_a_full_disk_is_retried_then_refused(tiny_disk, capfd):
    weights = tiny_disk / "weights"
    v1 = weights / "policy_v1.safetensors"
    digest = save_state(_state(1), v1)
    _fill(tiny_disk)
    v2 = weights / "policy_v2.safetensors"
    with pytest.raises(OSError) as e:
        publish_state(_state(2), v2, version=2, attempts=2, wait_s=0.01)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(v2)
    assert "keep version 1" in e.value.strerror and "resume=true" in e.value.strerror
    assert capfd.readouterr().out.count("weights.write_failed") == 2
    (tiny_disk / "filler").unlink()
    _assert_only_version(weights, v1, digest)


def test_a_torch_save_on_a_full_disk_is_named_enospc(tiny_disk):
    """DeepSpeed's checkpoint files are torch.save'd: its C++ writer raises a bare RuntimeError."""
    _fill(tiny_disk)
    target = tiny_disk / "model_states.pt"
    with pytest.raises(RuntimeError) as e:
        torch.save(_state(1), target)
    fault = disk_error(e.value, target)
    assert fault is not None and fault.errno == errno.ENOSPC and fault.filename == str(target)
    assert disk_error(ValueError("a bug"), target) is None
