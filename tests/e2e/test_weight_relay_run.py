"""A short training run with rollout.weight_sync=relay and two stand-alone rollout workers that share no files
with the coordinator: each has its own copy of the config and initial policy and its own --local-dir, and every
policy version reaches it over the transport (engine/coordinator/relay.py -> actors/weight_relay.py)."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from engine.backends.weights_file import digest_file
from tests.helpers import processes_mentioning, wait_for

pytestmark = pytest.mark.timeout(400)
STEPS = 4


def test_relay_run_trains_with_workers_that_never_see_the_learners_folder(tmp_path):
    run_dir = tmp_path / "coordinator" / "tiny"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", f"out_dir={tmp_path / 'coordinator'}",
         "progress=false", f"sft.cache_dir={tmp_path / 'coordinator' / 'sft_cache'}", "rollout.num_workers=0",
         "rollout.weight_sync=relay", "rollout.relay_chunk_bytes=16384", f"train.num_steps={STEPS}",
         "task.num_eval=8", "transport.heartbeat_s=0.5", "transport.peer_timeout_s=10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers, logs = [], []
    try:
        wait_for(lambda: (run_dir / "join.json").exists(), proc, 300, "the actors to start")
        cmd = json.loads((run_dir / "join.json").read_text())["rollout_worker"]
        args = dict(zip(cmd[1::2], cmd[2::2]))
        for i in range(2):  # two "hosts": what a user copies there by hand, and nothing else
            host = tmp_path / f"host{i}"
            host.mkdir()
            shutil.copy(args["--config"], host / "config.yaml")
            shutil.copytree(args["--init"], host / "init")
            logs.append(host / "worker.log")
            with open(logs[-1], "wb") as out:
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "actors.rollout_worker", "--endpoint", args["--endpoint"], "--config",
                     str(host / "config.yaml"), "--worker-id", str(100 + i), "--init", str(host / "init"),
                     "--local-dir", str(host / "relay")], stdout=out, stderr=subprocess.STDOUT, cwd=host))
        out, err = proc.communicate(timeout=360)
        codes = [w.wait(timeout=60) for w in workers]
    finally:
        for p in (proc, *workers):
            if p.poll() is None:
                p.kill()
    assert proc.returncode == 0, err[-3000:]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == STEPS, summary
    assert "weights.relay_offered" in err
    learner_weights = run_dir / "weights"
    final_digest = digest_file(learner_weights / f"policy_v{STEPS}.safetensors")
    for i, log in enumerate(logs):
        text = log.read_text()
        assert str(learner_weights) not in text and str(tmp_path / "coordinator") not in text  # never named there
        done = re.findall(r"weights\.relay_complete\s+.*", text)
        paths = [re.search(r"path=(\S+)", line).group(1) for line in done]
        versions = [int(re.search(r"version=(\d+)", line).group(1)) for line in done]
        assert paths and all(p.startswith(str(tmp_path / f"host{i}" / "relay")) for p in paths), done
        assert versions[-1] == STEPS and versions == sorted(versions), versions
        assert f"digest={final_digest}" in done[-1]  # the learner's final file, byte for byte
        assert re.search(rf"rollout\.done\s+.*version={STEPS}\b", text), text[-2000:]  # it served the last version
        assert not any(p.is_file() for p in (tmp_path / f"host{i}" / "relay").rglob("*"))  # removed at exit
    assert processes_mentioning(str(tmp_path)) == []
