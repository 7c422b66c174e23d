"""Per-worker sample counts (engine/coordinator/streams.py -> counters.py ``samples_by_worker``): the producer of
engine/coordinator/loop.py with two real rollout Peers over loopback ZeroMQ; the counts go into the per-step record
and the checkpoint, and come back on restore. Also the "rl" progress bar of a resumed run (loop.py)."""

import numpy as np
import pytest

from configs.schema import RolloutConfig, RunConfig, TrainConfig
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.loop import on_message, progress_steps
from engine.coordinator.rollouts import PromptItem, Rollouts
from transport import Hello, Hub, Peer, ResponseChunk, run

pytestmark = pytest.mark.timeout(60)


async def _peers(hub: Hub, n: int) -> tuple[list[Peer], list[str]]:
    peers, ids = [], []
    for i in range(n):
        peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=i, pid=1), heartbeat_s=0.5,
                    peer_timeout_s=30.0)
        await peer.start()
        peer_id, hello = await hub.recv(timeout=10)
        assert isinstance(hello, Hello)
        peers.append(peer)
        ids.append(peer_id)
    return peers, ids


def _chunk(gid: str, index: int) -> ResponseChunk:
    return ResponseChunk(group_id=gid, sample_index=index, prompt_id=1, offset=0, token_ids=np.array([9, 2], np.int32),
                         behavior_logprobs=np.zeros(2, np.float32), token_versions=np.zeros(2, np.int32),
                         finish_reason="stop")


def test_finished_rl_samples_are_counted_by_the_worker_that_made_them():
    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        peers, ids = await _peers(hub, 2)
        try:
            r = Rollouts(hub, rollout=RolloutConfig(group_size=2), train=TrainConfig(groups_per_step=4),
                         max_new_tokens=8, workers=ids, rewards=ids)
            groups = [r.admit(PromptItem(i, [1, 5], "3")) for i in range(4)]
            await r.dispatch.groups(groups)
            expected: dict[str, int] = {}
            for g in groups:
                for index in range(g.num_samples):
                    owner = r.inflight.owner[(g.group_id, index)]
                    name = owner.rsplit("-", 1)[0]  # "rollout-1-<pid>" -> "rollout-1"
                    expected[name] = expected.get(name, 0) + 1
                    await on_message(r, owner, _chunk(g.group_id, index))
            await on_message(r, ids[0], _chunk(groups[0].group_id, 0))  # not its owner any more: not counted
            assert r.counters.samples_by_worker == expected and sorted(expected) == ["rollout-0", "rollout-1"]
            assert sum(expected.values()) == 8
            assert r.counters.generated_samples == 8
            assert r.counters.metrics()["samples_by_worker"] == expected  # the per-step record
            restored = RolloutCounters()
            restored.restore(r.counters.to_dict())  # the checkpoint's counts
            assert restored.samples_by_worker == expected and restored.generated_samples == 8
            await r.stop()
        finally:
            for peer in peers:
                await peer.close()
            await hub.close()

    run(scenario())


def test_the_progress_bar_of_a_resumed_run_counts_from_the_resumed_step(capsys):
    cfg = RunConfig(progress=True, train=TrainConfig(num_steps=6))
    bar = progress_steps(cfg, first=4)
    assert (bar.n, bar.total) == (3, 6)
    assert list(bar) == [4, 5, 6] and bar.n == 6
    bar.close()
    err = capsys.readouterr().err
    assert "3/6" in err and "6/6" in err and "0/3" not in err
    fresh = progress_steps(cfg, first=1)
    assert (fresh.n, fresh.total) == (0, 6)
    fresh.close()
