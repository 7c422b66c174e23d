"""The rollout stage of zero-variance elimination in the coordinator (engine/coordinator/rollouts.py): adaptive group size
from known pass rates within the extra-sample budget, and top-ups decided on raw correctness. The coordinator
talks to a real Peer over loopback ZeroMQ that plays the rollout and reward worker."""

import numpy as np
import pytest

from engine.coordinator.buffer import GroupBuffer
from engine.coordinator.rollouts import PromptItem, Rollouts, Sampling
from transport import (ContinueRequest, GenerateRequest, Hello, Hub, Peer, ResponseChunk, Scored, ScoreRequest,
                       run)

pytestmark = pytest.mark.timeout(60)


async def _pair():
    hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
    await hub.start()
    peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=0, pid=1), heartbeat_s=0.5, peer_timeout_s=30.0)
    await peer.start()
    peer_id, hello = await hub.recv(timeout=10)
    assert isinstance(hello, Hello)
    return hub, peer, peer_id


def _rollouts(hub, peer_id, buffer, **sampling) -> Rollouts:
    return Rollouts(hub, workers=[peer_id], rewards=[peer_id], buffer=buffer, group_size=4, temperature=1.0,
                    max_new_tokens=8, groups_per_step=4, max_staleness=1, sampling=Sampling(**sampling))


def test_adaptive_group_size_follows_pass_rates_within_the_budget():
    async def scenario():
        hub, peer, peer_id = await _pair()
        try:
            r = _rollouts(hub, peer_id, GroupBuffer(), adaptive=True, max_group_size=16, extra_sample_frac=1.0)
            # p = 0.95: p^N + (1-p)^N <= 0.5 needs N = 14; the budget so far (1.0 x 4 base samples) allows +4
            assert r._group_size_for(PromptItem(1, [1], "1", pass_rate=0.95)) == 8
            assert r._group_size_for(PromptItem(2, [1], "1", pass_rate=0.5)) == 4  # 0.5^4 * 2 = 0.125: enough
            r._sampling.extra_sample_frac = 10.0
            assert r._group_size_for(PromptItem(3, [1], "1", pass_rate=0.95)) == 14
            r.source_zv["hard"] = 0.9  # no pass rate: the source's zero-variance rate decides
            assert r._group_size_for(PromptItem(4, [1], "1", source="hard")) == 16
            assert r._group_size_for(PromptItem(5, [1], "1", source="easy")) == 4
            assert r.counts["adaptive_extra_samples"] == 4 + 10 + 12
        finally:
            await peer.close()
            await hub.close()

    run(scenario())


def test_a_group_that_agrees_on_raw_correctness_is_topped_up_not_wasted():
    async def scenario():
        hub, peer, peer_id = await _pair()
        buffer = GroupBuffer()
        try:
            r = _rollouts(hub, peer_id, buffer, top_up=4, extra_sample_frac=1.0)
            r.counts["base_samples"] = 8  # budget for one top-up of 4
            await r._submit("g1", PromptItem(7, [1, 5], "3"), 4, 1.0)
            assert isinstance(await peer.recv(), GenerateRequest)

            async def answer(index: int, correct: float, shaped: float):
                await r.on_chunk(peer_id, ResponseChunk(
                    group_id="g1", sample_index=index, prompt_id=7, offset=0, token_ids=np.array([9, 2], np.int32),
                    behavior_logprobs=np.zeros(2, np.float32), token_versions=np.zeros(2, np.int32),
                    finish_reason="stop"))
                assert isinstance(await peer.recv(), ScoreRequest)
                await r.on_scored(Scored(sample_key=f"g1/{index}", reward=shaped, valid=True,
                                         reward_parts={"correct": correct}))

            for i in range(4):  # all correct; shaped rewards differ (a length penalty, say): still no signal
                await answer(i, 1.0, 1.0 - 0.1 * i)
            assert len(buffer) == 0  # not complete: topped up
            asked = [await peer.recv() for _ in range(4)]
            assert all(isinstance(m, ContinueRequest) and len(m.prefix) == 0 for m in asked)
            assert sorted(m.sample_index for m in asked) == [4, 5, 6, 7] and r.counts["top_up_samples"] == 4
            for i in range(4, 8):
                await answer(i, 0.0 if i == 5 else 1.0, 0.0 if i == 5 else 1.0)
            assert len(buffer) == 1 and buffer.groups()[0].num_samples == 8  # now informative, once
        finally:
            await peer.close()
            await hub.close()

    run(scenario())
