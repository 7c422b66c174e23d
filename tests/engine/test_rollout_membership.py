"""Worker membership in the producer (engine/coordinator/workers.py, scoring.py, through loop.py::on_message), with
real Peers over loopback ZeroMQ. The pump (cluster.py) forgets a dead worker's peer at the hub and then queues its
WorkerLost for the producer, so for a moment the producer still counts a worker the hub no longer knows, and reads
frames the hub queued before the loss: neither may crash the run or bring the worker back."""

import asyncio

import numpy as np
import pytest

from configs.schema import RolloutConfig, TrainConfig
from engine.coordinator.inbox import WorkerLost
from engine.coordinator.loop import on_message
from engine.coordinator.rollouts import Rollouts
from transport import Hello, Hub, LoadWeights, Peer, ScoreRequest, WeightsLoaded, run

pytestmark = pytest.mark.timeout(60)


async def _peer(hub: Hub, worker_id: int, role: str = "rollout") -> tuple[Peer, str]:
    peer = Peer(hub.endpoint, hello=Hello(role=role, worker_id=worker_id, pid=100 + worker_id), heartbeat_s=0.5,
                peer_timeout_s=30.0)
    await peer.start()
    peer_id, hello = await hub.recv(timeout=10)
    assert isinstance(hello, Hello)
    return peer, peer_id


def test_a_late_report_from_a_lost_worker_does_not_hold_an_eval_back():
    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        (a, a_id), (b, b_id) = await _peer(hub, 0), await _peer(hub, 1)
        try:
            r = Rollouts(hub, rollout=RolloutConfig(), train=TrainConfig(), max_new_tokens=8, workers=[a_id, b_id],
                         rewards=[])
            await r.load_weights(LoadWeights(version=1, path="unused"))
            await on_message(r, a_id, WeightsLoaded(version=1, worker_id=0))
            await on_message(r, b_id, WeightsLoaded(version=1, worker_id=1))
            await r.load_weights(LoadWeights(version=2, path="unused"))
            await on_message(r, a_id, WorkerLost(role="rollout"))  # a's process was killed ...
            await on_message(r, a_id, WeightsLoaded(version=1, worker_id=0, idle_s=1.0))  # ... its last report, late
            await on_message(r, b_id, WeightsLoaded(version=2, worker_id=1, idle_s=0.5))
            await asyncio.wait_for(r.workers.wait_weights(2), 10)  # every live worker has version 2
            assert r.workers.versions == {b_id: 2} and r.workers.peers == [b_id]
            assert set(r.workers.clocks()) == {b_id}  # the lost worker's idle time is not averaged in either
            await r.stop()
        finally:
            await a.close()
            await b.close()
            await hub.close()

    run(scenario())


def test_work_sent_to_a_worker_forgotten_by_the_hub_is_requeued_once_its_loss_arrives():
    async def scenario():
        hub = Hub(heartbeat_s=0.5, peer_timeout_s=30.0)
        await hub.start()
        (w, w_id), (r1, r1_id), (r2, r2_id) = await _peer(hub, 0), await _peer(hub, 1, "reward"), \
            await _peer(hub, 2, "reward")
        try:
            r = Rollouts(hub, rollout=RolloutConfig(), train=TrainConfig(), max_new_tokens=8, workers=[w_id],
                         rewards=[r1_id, r2_id])
            hub.forget(w_id)  # the pump saw both processes die; their WorkerLost is still queued
            hub.forget(r1_id)
            await r.load_weights(LoadWeights(version=1, path="unused"))  # the trainer's broadcast: no KeyError
            for i in range(2):  # round-robin: the first goes to the forgotten r1 (dropped), the second to r2
                await r.scoring.send(ScoreRequest(sample_key=f"g/{i}", token_ids=np.ones(1, np.int32), answer="1"))
            got = [await asyncio.wait_for(r2.recv(), 10)]
            await on_message(r, r1_id, WorkerLost(role="reward"))  # r1's unanswered request goes to r2
            await on_message(r, w_id, WorkerLost(role="rollout"))
            got.append(await asyncio.wait_for(r2.recv(), 10))
            assert sorted(m.sample_key for m in got) == ["g/0", "g/1"] and r.counters.requeued_scores == 1
            assert r.workers.peers == [] and r.scoring.rewards == [r2_id]
            await r.stop()
        finally:
            for p in (w, r1, r2):
                await p.close()
            await hub.close()

    run(scenario())
