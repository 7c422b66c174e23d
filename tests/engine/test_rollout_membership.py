"""Rollout worker membership in the producer (engine/coordinator/workers.py through loop.py::on_message), with two
real Peers over loopback ZeroMQ: a worker declared lost stays gone, even when a report it sent before dying is
read after its loss (the hub queues frames before the pump sees the process exit)."""

import asyncio

import pytest

from configs.schema import RolloutConfig, TrainConfig
from engine.coordinator.inbox import WorkerLost
from engine.coordinator.loop import on_message
from engine.coordinator.rollouts import Rollouts
from transport import Hello, Hub, LoadWeights, Peer, WeightsLoaded, run

pytestmark = pytest.mark.timeout(60)


async def _peer(hub: Hub, worker_id: int) -> tuple[Peer, str]:
    peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=worker_id, pid=100 + worker_id), heartbeat_s=0.5,
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
