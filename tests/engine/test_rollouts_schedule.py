"""The coordinator's length-aware dispatch, post-processing pool and reward overlap (the producer of
engine/coordinator/loop.py over the parts of engine/coordinator/rollouts.py), against real Peers over loopback
ZeroMQ that play two rollout workers and a reward worker."""

import asyncio
import contextlib

import numpy as np
import pytest

from configs.schema import RolloutConfig, TrainConfig
from engine.coordinator.loop import admit_prompts, on_message
from engine.coordinator.rollouts import PromptItem, Rollouts
from engine.coordinator.schedule import LengthPredictor, Scheduler
from transport import GenerateRequest, Hello, Hub, Peer, ResponseChunk, ScoreRequest, run

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def _peers(roles: list[str]):
    """A Hub (the coordinator's side) and one connected Peer per role: yields (hub, peers, peer ids)."""
    hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
    await hub.start()
    peers, ids = [], []
    try:
        for i, role in enumerate(roles):
            p = Peer(hub.endpoint, hello=Hello(role=role, worker_id=i, pid=1), heartbeat_s=0.5, peer_timeout_s=30.0)
            peers.append(p)
            await p.start()
            peer_id, hello = await hub.recv(timeout=10)
            assert isinstance(hello, Hello)
            ids.append(peer_id)
        yield hub, peers, ids
    finally:
        for p in peers:
            await p.close()
        await hub.close()


async def _drain(peer: Peer, kind: type, timeout: float = 0.5) -> list:
    out = []
    while True:
        try:
            msg = await peer.recv(timeout=timeout)
        except TimeoutError:
            return out
        if isinstance(msg, kind):
            out.append(msg)


def _chunk(req: GenerateRequest, index: int, n: int) -> ResponseChunk:
    return ResponseChunk(group_id=req.group_id, sample_index=index, prompt_id=req.prompt_id, offset=0,
                         token_ids=np.full(n, 5, np.int32), behavior_logprobs=np.zeros(n, np.float32),
                         token_versions=np.zeros(n, np.int32), finish_reason="stop")


def test_length_aware_dispatch_sends_longest_first_to_the_least_loaded_worker():
    async def scenario():
        async with _peers(["rollout", "rollout", "reward"]) as (hub, (w0, w1, rw), ids):
            pred = LengthPredictor()
            for prompt, length in ((0, 10), (1, 500), (2, 50), (3, 400)):  # an earlier epoch
                pred.observe(prompt, "s", [length])
            r = Rollouts(hub, rollout=RolloutConfig(group_size=2, schedule="length_aware"),
                         train=TrainConfig(groups_per_step=4, max_staleness=0), max_new_tokens=8,
                         workers=ids[:2], rewards=ids[2:], scheduler=Scheduler("length_aware", pred))
            r.start(admit_prompts(r, iter([PromptItem(p, [1, 2], "", source="s") for p in range(4)]), total_groups=4))
            got0, got1 = await _drain(w0, GenerateRequest), await _drain(w1, GenerateRequest)
            # 1 (1000 predicted tokens) -> w0; 3 (800) -> w1; 2 and 0 -> w1, still the less loaded
            assert [m.prompt_id for m in got0] == [1]
            assert [m.prompt_id for m in got1] == [3, 2, 0]
            assert all(m.num_samples == 2 for m in got0 + got1)  # a whole group on one worker
            await r.stop()

    run(scenario())


@pytest.mark.parametrize("overlap", [True, False])
def test_scores_go_through_the_pool_as_responses_finish_or_after_the_wave(overlap):
    async def scenario():
        async with _peers(["rollout", "reward"]) as (hub, (w0, rw), ids):
            processed = []
            r = Rollouts(hub, rollout=RolloutConfig(group_size=2, postprocess_workers=2, reward_overlap=overlap),
                         train=TrainConfig(groups_per_step=1, max_staleness=0), max_new_tokens=8,
                         workers=ids[:1], rewards=ids[1:], postprocess=lambda t: processed.append(len(t)))
            r.start(admit_prompts(r, iter([PromptItem(0, [1, 2], "", source="s")]), total_groups=1))
            (req,) = await _drain(w0, GenerateRequest)
            await on_message(r, ids[0], _chunk(req, 0, 3))
            first = await _drain(rw, ScoreRequest)
            assert len(first) == (1 if overlap else 0)  # without overlap it waits for the other response
            await on_message(r, ids[0], _chunk(req, 1, 4))
            rest = await _drain(rw, ScoreRequest)
            assert sorted(m.sample_key for m in first + rest) == [f"{req.group_id}/0", f"{req.group_id}/1"]
            assert sorted(processed) == [3, 4]  # every response went through the pool first
            await r.stop()

    run(scenario())


def test_fifo_dispatch_spreads_groups_by_outstanding_samples():
    async def scenario():
        async with _peers(["rollout", "rollout", "reward"]) as (hub, (w0, w1, rw), ids):
            r = Rollouts(hub, rollout=RolloutConfig(group_size=2),
                         train=TrainConfig(groups_per_step=4, max_staleness=0), max_new_tokens=8,
                         workers=ids[:2], rewards=ids[2:])
            r.start(admit_prompts(r, iter([PromptItem(p, [1, 2], "", source="s") for p in range(4)]), total_groups=4))
            got0, got1 = await _drain(w0, GenerateRequest), await _drain(w1, GenerateRequest)
            assert [m.prompt_id for m in got0] == [0, 2] and [m.prompt_id for m in got1] == [1, 3]
            await asyncio.sleep(0)
            await r.stop()

    run(scenario())
