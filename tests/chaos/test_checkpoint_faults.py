"""Disk faults: checkpoints are written atomically (staging folder, fsync, rename), and a torn or corrupt newest
checkpoint is detected at load with a clear logged error and the previous one is used."""

import json
import os

import numpy as np
import pytest

from engine.coordinator import checkpoint
from engine.coordinator.buffer import Group

pytestmark = pytest.mark.chaos


def _save(run_dir, step: int) -> None:
    path = checkpoint.staging_dir(run_dir, step)
    (path / "learner" / "state").mkdir(parents=True)
    (path / "learner" / "state" / "model_states.pt").write_bytes(os.urandom(4096))  # what DeepSpeed would write
    policy = run_dir / f"policy_v{step}.safetensors"
    policy.write_bytes(os.urandom(1024))
    g = Group(group_id=f"g{step}", prompt_id=step, prompt_ids=np.arange(3, dtype=np.int32), answer="1",
              num_samples=2, temperature=1.0)
    state = {"inflight": [g], "buffer": [], "counts": {"prompts_taken": step}, "sent_version": step}
    checkpoint.save_coordinator(path, step=step, version=step, rollouts_state=state, extra={},
                                policy_file=str(policy))


def _flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["flipped_learner_byte", "torn_arrays", "missing_policy", "garbled_meta",
                                   "missing_meta"])
def test_a_corrupt_newest_checkpoint_is_skipped_with_a_clear_error(tmp_path, fault, capsys):
    _save(tmp_path, 3)
    _save(tmp_path, 6)
    newest = tmp_path / "checkpoints" / "step_000006"
    assert checkpoint.latest(tmp_path).step == 6
    if fault == "flipped_learner_byte":
        _flip_byte(newest / "learner" / "state" / "model_states.pt")
    elif fault == "torn_arrays":
        (newest / "arrays.npz").write_bytes((newest / "arrays.npz").read_bytes()[:50])
    elif fault == "missing_policy":
        (newest / "policy.safetensors").unlink()
    elif fault == "garbled_meta":
        (newest / "meta.json").write_text('{"step": 6, "files"')
    else:
        (newest / "meta.json").unlink()
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3  # the previous one
    assert checkpoint.load_coordinator(ckpt)["counts"] == {"prompts_taken": 3}
    out = capsys.readouterr().out
    assert "checkpoint.corrupt" in out and "step_000006" in out
    with pytest.raises(checkpoint.CheckpointCorrupt):
        checkpoint.verify(newest)


def test_a_crash_while_saving_leaves_only_a_staging_folder_and_the_next_save_replaces_it(tmp_path):
    _save(tmp_path, 3)
    staging = checkpoint.staging_dir(tmp_path, 6)
    (staging / "learner").mkdir(parents=True)
    (staging / "learner" / "half_written.pt").write_bytes(b"\0" * 100)  # the learner died mid-save
    assert checkpoint.latest(tmp_path).step == 3
    _save(tmp_path, 6)
    assert checkpoint.latest(tmp_path).step == 6
    assert not staging.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000006"]


def test_the_manifest_covers_every_file_and_only_the_two_newest_are_kept(tmp_path):
    for step in (3, 6, 9):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000006", "step_000009"]
    meta = json.loads((root / "step_000009" / "meta.json").read_text())
    on_disk = {str(p.relative_to(root / "step_000009")) for p in (root / "step_000009").rglob("*")
               if p.is_file() and p.name != "meta.json"}
    assert set(meta["files"]) == on_disk
    assert (root / "latest").read_text() == "step_000009"


def test_a_restore_carries_the_policy_digest_workers_check(tmp_path):
    """A resumed run's LoadWeights carries the checkpoint's own sha256 of its policy file, as a published version
    does (engine/backends/weights_file.py): a torn policy file is refused by the worker, never served."""
    from engine.backends.weights_file import digest_file

    _save(tmp_path, 3)
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt.policy_digest == digest_file(ckpt.policy_path)
