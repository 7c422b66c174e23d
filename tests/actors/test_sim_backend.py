"""The simulated backend: real RolloutWorker actors hosted by one child process, answering over loopback ZeroMQ
with the workload's deterministic lengths and tokens; the simulated learner speaks the learner protocol."""

import asyncio
import subprocess
import sys
import time

import numpy as np
import pytest

from configs.load import load, save
from configs.schema import SimConfig
from engine.backends import simulate
from engine.coordinator.procs import python_module, spawn, stop_all
from engine.data.tasks import CharTokenizer
from transport import (GenerateRequest, Hello, Hub, LoadWeights, ResponseChunk, Shutdown, TrainBatch, TrainResult,
                       WeightsLoaded, run)

pytestmark = pytest.mark.timeout(90)

_OVERRIDES = ["rollout.backend=sim", "rollout.return_routes=false", "learner.router_replay=off",
              "rollout.chunk_tokens=8", "task.max_answer_tokens=64", "sim.time_scale=0.01", "sim.mean_len=20",
              "transport.heartbeat_s=0.5"]


async def _recv(hub: Hub, child, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.exited() is None, f"{child.name} exited early:\n{child.log_tail()}"
        try:
            return await hub.recv(timeout=0.5)
        except TimeoutError:
            continue
    raise AssertionError(f"nothing from {child.name} within {timeout}s:\n{child.log_tail()}")


def test_one_process_hosts_many_rollout_workers_with_deterministic_lengths(tmp_path):
    cfg = load(_OVERRIDES)
    save(cfg, tmp_path / "config.yaml")

    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        child = spawn("sim-workers-0", python_module("engine.backends.sim", "--endpoint", hub.endpoint, "--config",
                                                     str(tmp_path / "config.yaml"), "--worker-id", "0", "--count",
                                                     "3"), log_dir=tmp_path / "logs")
        try:
            peers = {}
            while len(peers) < 3:
                peer, msg = await _recv(hub, child)
                assert isinstance(msg, Hello) and msg.role == "rollout"
                peers[msg.worker_id] = peer
            assert sorted(peers) == [0, 1, 2] and len(set(peers.values())) == 3  # one socket each
            req = GenerateRequest(group_id="g1", prompt_id=11, prompt_ids=np.arange(3, 10, dtype=np.int32),
                                  num_samples=4, max_new_tokens=64, temperature=1.0)
            await hub.send(peers[1], LoadWeights(version=3, path="unused.safetensors"))
            await hub.send(peers[1], req)
            tokens: dict[int, list] = {}
            finished, loaded = {}, None
            while len(finished) < 4:
                peer, msg = await _recv(hub, child)
                if isinstance(msg, WeightsLoaded):
                    loaded = msg
                    continue
                assert isinstance(msg, ResponseChunk) and peer == peers[1]
                assert msg.offset == len(tokens.setdefault(msg.sample_index, []))
                tokens[msg.sample_index] += msg.token_ids.tolist()
                assert set(msg.token_versions.tolist()) == {3}
                if msg.finish_reason:
                    finished[msg.sample_index] = msg.finish_reason
            assert loaded is not None and loaded.version == 3
            tok = CharTokenizer()
            for i in range(4):
                n = simulate.sample_length(11, "g1", i, 64, cfg.sim)
                stop = n < 64
                assert finished[i] == ("stop" if stop else "length")
                want = simulate.response_tokens(11, i, n, vocab_size=tok.vocab_size, eos_id=tok.eos_id, stop=stop)
                assert tokens[i] == want.tolist()
            for peer in peers.values():
                await hub.send(peer, Shutdown())
            deadline = time.monotonic() + 10
            while child.exited() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert child.exited() == 0, child.log_tail()
        finally:
            stop_all([child], grace_s=0)
            await hub.close()

    run(scenario())


def test_sim_learner_answers_train_batches_with_new_versions(tmp_path):
    cfg = load([*_OVERRIDES, "sim.learner=true", "sim.train_base_s=0.01"])
    save(cfg, tmp_path / "config.yaml")

    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        child = spawn("learner", python_module("actors.sim_learner", "--endpoint", hub.endpoint, "--config",
                                               str(tmp_path / "config.yaml"), "--weights-dir", "w"),
                      log_dir=tmp_path / "logs")
        try:
            peer, hello = await _recv(hub, child)
            assert isinstance(hello, Hello) and hello.role == "learner"
            z = np.zeros((2, 5), np.int32)
            for step in (1, 2):
                await hub.send(peer, TrainBatch(step=step, input_ids=z, prompt_lens=np.array([2, 2], np.int32),
                                                response_lens=np.array([3, 1], np.int32),
                                                behavior_logprobs=z.astype(np.float32), token_versions=z,
                                                advantages=np.zeros(2, np.float32)))
                _, res = await _recv(hub, child)
                assert isinstance(res, TrainResult) and res.version == step and res.stats["tokens"] == 8
                assert res.weights_path.endswith(f"policy_v{step}.safetensors")
                assert res.weights_digest == ""  # no sim.weights_file: nothing is written, nothing to check
            await hub.send(peer, Shutdown())
        finally:
            stop_all([child], grace_s=5)
            await hub.close()

    run(scenario())


def test_sim_worker_process_imports_neither_torch_nor_transformers():
    code = "import sys, engine.backends.sim, actors.sim_learner; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_workload_lengths_are_long_tailed_and_stable_per_prompt():
    sim = SimConfig(mean_len=64, num_sources=4)
    typical = np.array([simulate.typical_length(p, sim) for p in range(4000)])
    assert typical.max() / np.median(typical) > 8  # a long tail
    assert simulate.typical_length(17, sim) == simulate.typical_length(17, sim)  # a property of the prompt
    epoch1 = [simulate.sample_length(17, "g1", i, 512, sim) for i in range(64)]
    epoch2 = [simulate.sample_length(17, "g900", i, 512, sim) for i in range(64)]
    assert epoch1 != epoch2  # new draws in a new epoch ...
    assert abs(np.log(np.mean(epoch1) / np.mean(epoch2))) < 0.2  # ... around the same typical length


def test_sim_learner_publishes_a_real_weights_file_under_each_version(tmp_path):
    """With sim.weights_file, every version's path is a loadable file (real rollout workers read it)."""
    from actors.sim_learner import publish

    src = tmp_path / "init" / "policy_v0.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    for v in (1, 2):
        publish(str(src), str(tmp_path / "w" / f"policy_v{v}.safetensors"))
    publish(str(src), str(tmp_path / "w" / "policy_v2.safetensors"))  # republishing replaces it
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["policy_v1.safetensors", "policy_v2.safetensors"]
    assert all(p.read_bytes() == b"weights" for p in (tmp_path / "w").iterdir())


def test_prefill_on_add_all_charges_a_rebuild_of_the_running_batch_like_decode_batch():
    """sim.prefill_on_add=all (the transformers backend): a row joining a running batch re-prefills every unfinished
    row, padded to the longest, once at the next step; "new" (prefix-cached engines) prefills the newcomer only."""
    from engine.backends.sim import SimBatch
    from engine.modeling.rows import Row

    def cost(mode: str) -> float:
        sim = SimConfig(prefill_on_add=mode, decode_base_s=0.0, decode_per_seq_s=0.0, prefill_per_token_s=1.0)
        b = SimBatch(sim, eos_id=2, vocab_size=98)
        b.add([Row(key=("g1", i, 1, False), prompt=[5] * 4, max_new_tokens=50, temperature=1.0) for i in range(2)])
        for _ in range(3):
            b.step(0)
        before = b.elapsed_s
        b.add([Row(key=("g2", 0, 2, False), prompt=[5] * 2, max_new_tokens=50, temperature=1.0)])
        b.add([Row(key=("g3", 0, 3, False), prompt=[5] * 2, max_new_tokens=50, temperature=1.0)])
        b.step(0)
        return b.elapsed_s - before

    assert cost("new") == 2 + 2  # each newcomer's prompt
    assert cost("all") == 4 * (4 + 3)  # one rebuild: 4 unfinished rows x the longest (prompt 4 + 3 tokens)
