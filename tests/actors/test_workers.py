"""Rollout and reward workers as real child processes answering over loopback ZeroMQ; the test is the hub."""

import asyncio
import contextlib
import time

import numpy as np
import pytest
import torch

from configs.load import load, save
from engine.modeling.model import build_model, save_model, save_weights
from engine.coordinator.procs import python_module, spawn, stop_all
from engine.data.tasks import build_task
from transport import (ResponseChunk, GenerateRequest, Hello, Hub, LoadWeights, ScoreRequest, Scored, Shutdown,
                       WeightsLoaded, run)

pytestmark = pytest.mark.timeout(180)


def _setup(tmp_path, *overrides):
    cfg = load(["transport.heartbeat_s=0.5", *overrides], config_name="tiny")
    save(cfg, tmp_path / "config.yaml")
    task = build_task(cfg.task)
    model = build_model(cfg.model, task.tokenizer.vocab_size, seed=0)
    save_model(model, tmp_path / "init")
    return cfg, task, model


async def _recv(hub: Hub, kind: type, child, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.exited() is None, f"{child.name} exited early:\n{child.log_tail()}"
        try:
            _, msg = await hub.recv(timeout=0.5)
        except TimeoutError:
            continue
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {type(msg).__name__}"
        return msg
    raise AssertionError(f"no {kind.__name__} within {timeout}s:\n{child.log_tail()}")


async def _exit_code(child, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while child.exited() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return child.exited()


@contextlib.asynccontextmanager
async def actor_process(tmp_path, module: str, *args: str, role: str):
    """A Hub playing the coordinator and one actor process (``python -m module``) connected to it: yields
    (hub, child, peer) once its Hello arrived; a block that ends normally also checks a clean exit on Shutdown."""
    hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
    await hub.start()
    child = spawn(f"{role}-0", python_module(module, "--endpoint", hub.endpoint, "--config",
                                             str(tmp_path / "config.yaml"), *args), log_dir=tmp_path / "logs")
    try:
        assert (await _recv(hub, Hello, child)).role == role
        peer = next(iter(hub.peers))
        yield hub, child, peer
        await hub.send(peer, Shutdown(reason="test"))
        assert await _exit_code(child) == 0, child.log_tail()
    finally:
        stop_all([child], grace_s=0.0)
        await hub.close()


async def _responses(hub: Hub, child, want: int) -> dict[tuple[str, int], list]:
    """Collect chunks until ``want`` responses finished: (group, sample) -> its chunks in arrival order."""
    chunks: dict[tuple[str, int], list] = {}
    done = 0
    while done < want:
        c = await _recv(hub, ResponseChunk, child)
        chunks.setdefault((c.group_id, c.sample_index), []).append(c)
        done += bool(c.finish_reason)
    return chunks


def test_rollout_worker_streams_chunks_and_takes_weights_in_flight(tmp_path):
    cfg, task, model = _setup(tmp_path, "rollout.chunk_tokens=2")
    prompt = np.asarray(task.prompt_ids(task.eval_set[0]), dtype=np.int32)

    async def scenario():
        async with actor_process(tmp_path, "actors.rollout_worker", "--init", str(tmp_path / "init"),
                                 role="rollout") as (hub, child, peer):
            await hub.send(peer, GenerateRequest(group_id="g0", prompt_id=7, prompt_ids=prompt, num_samples=3,
                                                 max_new_tokens=9, temperature=1.0, return_routes=True))
            for (group, _), chunks in (await _responses(hub, child, 3)).items():
                assert group == "g0" and [c.offset for c in chunks] == list(
                    np.cumsum([0] + [len(c.token_ids) for c in chunks[:-1]]))  # in order, no gap
                assert all(len(c.token_ids) <= 2 for c in chunks[:-1]) and not any(c.finish_reason for c in chunks[:-1])
                for c in chunks:  # routes ride with their tokens; the final token has none
                    assert len(c.routes) == len(c.token_ids) - bool(c.finish_reason) and c.routes.dtype == np.uint8
                    assert np.all(c.token_versions == 0) and np.all(c.behavior_logprobs <= 0)
            # weights in flight: a long batch is running when version 1 arrives
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            save_weights(model, tmp_path / "policy_v1.safetensors")
            await hub.send(peer, GenerateRequest(group_id="g1", prompt_id=8, prompt_ids=prompt, num_samples=64,
                                                 max_new_tokens=200, temperature=1.0))
            seen: list[ResponseChunk] = []
            first = await _recv(hub, ResponseChunk, child)
            await hub.send(peer, LoadWeights(version=1, path=str(tmp_path / "policy_v1.safetensors")))
            loaded = None
            while sum(bool(c.finish_reason) for c in [first] + seen) < 64:
                _, msg = await hub.recv(timeout=30)
                if isinstance(msg, WeightsLoaded):
                    loaded = msg
                elif isinstance(msg, ResponseChunk):
                    seen.append(msg)
            assert loaded is not None and loaded.version == 1 and loaded.paused_s > 0
            versions: dict[int, list[int]] = {}
            for c in [first] + seen:
                versions.setdefault(c.sample_index, []).extend(c.token_versions.tolist())
            spanning = [v for v in versions.values() if v[0] == 0 and v[-1] == 1]
            assert spanning, "no response spans the weight update"
            assert all(v == sorted(v) for v in versions.values())  # a version boundary, never back

    run(scenario())


def test_reward_worker_process_scores_responses(tmp_path):
    cfg, task, _ = _setup(tmp_path)
    ex = task.eval_set[0]
    answer_ids = np.asarray(task.tokenizer.encode(ex.answer) + [task.tokenizer.eos_id], dtype=np.int32)
    wrong_ids = np.asarray(task.tokenizer.encode(ex.answer + "9") + [task.tokenizer.eos_id], dtype=np.int32)

    async def scenario():
        async with actor_process(tmp_path, "actors.reward_worker", role="reward") as (hub, child, peer):
            await hub.send(peer, ScoreRequest(sample_key="g/0", token_ids=answer_ids, answer=ex.answer))
            await hub.send(peer, ScoreRequest(sample_key="g/1", token_ids=wrong_ids, answer=ex.answer))
            scores = {s.sample_key: s for s in [await _recv(hub, Scored, child) for _ in range(2)]}
            assert scores["g/0"].reward == 1.0 and scores["g/0"].valid and scores["g/0"].text == ex.answer
            assert scores["g/1"].reward == 0.0 and scores["g/1"].valid

    run(scenario())
