"""The rollout stage of zero-variance elimination in the coordinator: adaptive group size from known pass rates
within the extra-sample budget (the pure sampler, engine/coordinator/zero_variance.py), and top-ups decided on
raw correctness (the producer of engine/coordinator/loop.py, talking to a real Peer over loopback ZeroMQ that
plays the rollout and reward worker)."""

import numpy as np
import pytest

from configs.schema import RolloutConfig, TrainConfig
from engine.coordinator.buffer import Group
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.loop import on_message
from engine.coordinator.rollouts import PromptItem, Rollouts
from engine.coordinator.zero_variance import ZeroVarianceSampler
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


def test_adaptive_group_size_follows_pass_rates_within_the_budget():
    counters = RolloutCounters()
    cfg = RolloutConfig(group_size=4, adaptive_group_size=True, max_group_size=16, extra_sample_frac=1.0)
    zv = ZeroVarianceSampler(cfg, counters)
    # p = 0.95: p^N + (1-p)^N <= 0.5 needs N = 14; the budget so far (1.0 x 4 base samples) allows +4
    assert zv.group_size("", pass_rate=0.95) == 8
    assert zv.group_size("", pass_rate=0.5) == 4  # 0.5^4 * 2 = 0.125: enough
    cfg.extra_sample_frac = 10.0
    assert zv.group_size("", pass_rate=0.95) == 14
    zv.source_zv["hard"] = 0.9  # no pass rate: the source's zero-variance rate decides
    assert zv.group_size("hard", pass_rate=None) == 16
    assert zv.group_size("easy", pass_rate=None) == 4
    assert counters.adaptive_extra_samples == 4 + 10 + 12 and counters.base_samples == 5 * 4


def _scored(gid: str, correct: list[float], shaped: list[float] | None = None) -> Group:
    g = Group(group_id=gid, prompt_id=1, prompt_ids=np.array([1], np.int32), answer="1", num_samples=len(correct),
              source="s")
    for s, c, r in zip(g.ordered(), correct, shaped or correct):
        s.finish_reason, s.reward, s.valid, s.reward_parts = "stop", r, True, {"correct": c}
    return g


def test_top_up_decision_uses_raw_correctness_and_the_budget_once_per_group():
    counters = RolloutCounters(base_samples=4)
    zv = ZeroVarianceSampler(RolloutConfig(group_size=4, top_up=4, extra_sample_frac=1.0), counters, ema=0.5)
    g = _scored("g1", [1, 1, 1, 1], shaped=[1.0, 0.9, 0.8, 0.7])  # shaped rewards differ: still no signal
    assert zv.after_group(g) == 4 and counters.top_up_samples == 4 and zv.source_zv == {"s": 1.0}
    for s, c in zip([g.samples[i] for i in g.add_samples(4)], [1, 0, 1, 1]):
        s.finish_reason, s.reward, s.valid, s.reward_parts = "stop", c, True, {"correct": c}
    assert zv.after_group(g) == 0 and zv.source_zv == {"s": 1.0}  # once; its rate was counted already
    assert zv.after_group(_scored("g2", [1, 0, 1, 0])) == 0 and zv.source_zv == {"s": 0.5}  # EMA, weight 0.5
    assert zv.after_group(_scored("g3", [0, 0, 0, 0])) == 0  # agrees, but the budget (4 x 1.0 - 4) is spent
    assert counters.top_up_samples == 4


def test_a_group_that_agrees_on_raw_correctness_is_topped_up_not_wasted():
    async def scenario():
        hub, peer, peer_id = await _pair()
        try:
            r = Rollouts(hub, rollout=RolloutConfig(group_size=4, top_up=4, extra_sample_frac=1.0),
                         train=TrainConfig(groups_per_step=4, max_staleness=1), max_new_tokens=8,
                         workers=[peer_id], rewards=[peer_id])
            r.counters.base_samples = 4  # with the group's own 4: budget for one top-up of 4
            await r.dispatch.groups([r.admit(PromptItem(7, [1, 5], "3"))])
            assert isinstance(await peer.recv(), GenerateRequest)
            gid = "g1"

            async def answer(index: int, correct: float, shaped: float):
                await on_message(r, peer_id, ResponseChunk(
                    group_id=gid, sample_index=index, prompt_id=7, offset=0, token_ids=np.array([9, 2], np.int32),
                    behavior_logprobs=np.zeros(2, np.float32), token_versions=np.zeros(2, np.int32),
                    finish_reason="stop"))
                assert isinstance(await peer.recv(), ScoreRequest)
                await on_message(r, peer_id, Scored(sample_key=f"{gid}/{index}", reward=shaped, valid=True,
                                                    reward_parts={"correct": correct}))

            for i in range(4):  # all correct; shaped rewards differ (a length penalty, say): still no signal
                await answer(i, 1.0, 1.0 - 0.1 * i)
            assert len(r.buffer) == 0  # not complete: topped up
            asked = [await peer.recv() for _ in range(4)]
            assert all(isinstance(m, ContinueRequest) and len(m.prefix) == 0 for m in asked)
            assert sorted(m.sample_index for m in asked) == [4, 5, 6, 7] and r.counters.top_up_samples == 4
            for i in range(4, 8):
                await answer(i, 0.0 if i == 5 else 1.0, 0.0 if i == 5 else 1.0)
            assert len(r.buffer) == 1 and r.buffer.groups()[0].num_samples == 8  # now informative, once
            await r.stop()
        finally:
            await peer.close()
            await hub.close()

    run(scenario())
