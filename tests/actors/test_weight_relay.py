"""The weight relay (rollout.weight_sync=relay) over real ZeroMQ sockets on 127.0.0.1: the coordinator's sender
(engine/coordinator/relay.py) and each worker's receiver (actors/weight_relay.py), with faults injected through the
sender's ``tamper`` hook, the same code path the run uses; then a real RolloutWorker joining mid-run."""

import asyncio
import os
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from actors.rollout_worker import RolloutWorker
from actors.weight_relay import RelayReceiver
from configs.schema import RunConfig
from engine.backends import sim
from engine.backends.weights_file import digest_file
from engine.coordinator.relay import WeightRelay
from engine.coordinator.workers import RolloutWorkers
from transport import (FetchWeights, Hello, Hub, LoadWeights, Peer, Shutdown, WeightsChunk, WeightsLoaded,
                       WeightsOffer, run)

CHUNK = 4096
SIZE = 13 * CHUNK + 123  # 14 chunks, the last one short


def _publish(tmp_path: Path, version: int, size: int = SIZE) -> LoadWeights:
    """A learner-published file: random bytes (the relay never parses them), written once."""
    path = tmp_path / "learner" / f"policy_v{version}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(version).integers(0, 256, size, dtype=np.uint8).tobytes())
    return LoadWeights(version=version, path=str(path), digest=digest_file(path))


async def _until(cond, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


class _Rig:
    """A hub with the relay behind it and ``n`` worker-side receivers, each on its own Peer."""

    def __init__(self, tmp_path: Path, n: int, **receiver_kw) -> None:
        self.tmp_path, self.n, self.receiver_kw = tmp_path, n, receiver_kw
        self.ready: list[list[LoadWeights]] = [[] for _ in range(n)]
        self.refused: list[list[int]] = [[] for _ in range(n)]

    async def __aenter__(self):
        self.hub = Hub(heartbeat_s=0.2)
        await self.hub.start()
        self.relay = WeightRelay(self.hub, chunk_bytes=CHUNK)
        self.peers, self.receivers, self.ids = [], [], []
        for i in range(self.n):
            peer = Peer(self.hub.endpoint, hello=Hello(role="rollout", worker_id=i, pid=os.getpid()), heartbeat_s=0.2)
            await peer.start()
            self.peers.append(peer)

            async def refused(offer, i=i):
                self.refused[i].append(offer.version)
            self.receivers.append(RelayReceiver(peer.send, name=peer.peer_id, local_dir=str(self.tmp_path / f"host{i}"),
                                                on_ready=self.ready[i].append, on_refused=refused,
                                                **self.receiver_kw))
        while len(self.ids) < self.n:
            peer_id, msg = await self.hub.recv(timeout=10)
            assert isinstance(msg, Hello)
            self.ids.append(peer_id)
        self._tasks = [asyncio.create_task(self._coordinator())]
        self._tasks += [asyncio.create_task(self._worker(p, r)) for p, r in zip(self.peers, self.receivers)]
        return self

    async def _coordinator(self):  # what loop.py::on_message does with FetchWeights
        while True:
            peer_id, msg = await self.hub.recv()
            if isinstance(msg, FetchWeights):
                await self.relay.serve(peer_id, msg)

    @staticmethod
    async def _worker(peer: Peer, receiver: RelayReceiver):  # what RolloutWorker._receive_loop does
        while True:
            msg = await peer.recv()
            if isinstance(msg, WeightsOffer):
                receiver.offer(msg)
            elif isinstance(msg, WeightsChunk):
                receiver.chunk(msg)

    async def offer(self, msg: LoadWeights) -> WeightsOffer:
        offer = await self.relay.publish(msg)
        for peer_id in self.ids:
            await self.hub.send(peer_id, offer)
        return offer

    async def __aexit__(self, *exc):
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in self.receivers:
            r.close()
        self.relay.close()
        for p in self.peers:
            await p.close()
        await self.hub.close()


def _assert_own_copy(tmp_path: Path, worker: int, got: LoadWeights, source: LoadWeights) -> None:
    assert got.version == source.version and got.digest == source.digest
    assert Path(got.path).is_relative_to(tmp_path / f"host{worker}")  # its own folder, never the learner's
    assert Path(got.path).read_bytes() == Path(source.path).read_bytes()


@pytest.mark.timeout(60)
def test_relay_delivers_several_versions_to_two_workers_byte_exact(tmp_path):
    async def main():
        async with _Rig(tmp_path, 2) as rig:
            sources = []
            for v in (1, 2, 3):
                src = _publish(tmp_path, v, size=SIZE + v)
                if v == 2:
                    src = replace(src, digest="")  # a resume's checkpoint weights: the coordinator hashes them
                sources.append(src)
                offer = await rig.offer(src)
                assert offer.digest == digest_file(src.path) and offer.num_bytes == SIZE + v
                await _until(lambda: all(len(r) == v for r in rig.ready), 30, f"version {v} on both workers")
                for i in range(2):
                    _assert_own_copy(tmp_path, i, rig.ready[i][-1], replace(src, digest=offer.digest))
                    rig.receivers[i].loaded(v)
            for i in range(2):  # only the newest stays once it has loaded
                assert sorted(p.name for p in (tmp_path / f"host{i}").rglob("*") if p.is_file()) == \
                    ["policy_v3.safetensors"]
            assert rig.relay.chunks_sent == 2 * sum(-(-(SIZE + v) // CHUNK) for v in (1, 2, 3))  # no re-sends
            assert rig.refused == [[], []] and all(r.refused_chunks == 0 for r in rig.receivers)
        assert not any(p.is_file() for p in tmp_path.glob("host*/**/*"))  # each worker's folder goes when it stops
    run(main())


def _once_at(index: int, fault):
    """A tamper hook: ``fault`` applied to the first chunk ``index`` sent, every other chunk as it is."""
    state = {"fired": False, "held": None}

    def tamper(c: WeightsChunk) -> list[WeightsChunk]:
        if state["held"] is not None:  # a reorder: the held-back chunk goes out after the next one
            held, state["held"] = state["held"], None
            return [c, held]
        if c.index != index or state["fired"]:
            return [c]
        state["fired"] = True
        return fault(c, state)
    return tamper


def _flip(c: WeightsChunk, *, fix_crc: bool) -> WeightsChunk:
    data = c.data.copy()
    data[7] ^= 0x40
    return replace(c, data=data, crc32=zlib.crc32(data) if fix_crc else c.crc32)


FAULTS = {  # name -> (fault, chunk index, logged reason)
    "lost": (lambda c, s: [], 2, "out_of_order"),
    "lost_last": (lambda c, s: [], SIZE // CHUNK, "lost"),  # nothing comes after it: the request times out
    "duplicated": (lambda c, s: [c, c], 2, "duplicate"),
    "reordered": (lambda c, s: s.update(held=c) or [], 2, "out_of_order"),
    "truncated": (lambda c, s: [replace(c, data=c.data[:-100])], 2, "truncated"),
    "corrupted": (lambda c, s: [_flip(c, fix_crc=False)], 2, "corrupted"),
    "corrupted_crc_fixed": (lambda c, s: [_flip(c, fix_crc=True)], 2, None),  # only the whole-file digest sees it
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_chunk_is_refused_with_its_reason_and_fetched_again(tmp_path, fault):
    tamper, index, reason = FAULTS[fault]

    async def main():
        async with _Rig(tmp_path, 1, chunk_timeout_s=0.5) as rig:
            rig.relay.tamper = _once_at(index, tamper)
            src = _publish(tmp_path, 1)
            with capture_logs() as logs:
                await rig.offer(src)
                await _until(lambda: rig.ready[0], 30, "the version after the fault")
            _assert_own_copy(tmp_path, 0, rig.ready[0][0], src)
            refused = [e for e in logs if e["event"] == "weights.chunk_refused"]
            if reason is None:  # the version was fetched again from its first chunk
                assert [e["event"] for e in logs if e["event"].startswith("weights.relay_")] == \
                    ["weights.relay_offered", "weights.relay_digest_mismatch", "weights.relay_failed",
                     "weights.relay_complete"]
                assert rig.relay.chunks_sent == 2 * (SIZE // CHUNK + 1)
            else:
                first = refused[0] if refused else {}
                # the chunk the worker waited for (a duplicate: the one that came again)
                which = "index" if fault == "duplicated" else "expected"
                assert first.get("reason") == reason and first[which] == index, refused
                assert not [e for e in logs if e["event"] == "weights.relay_digest_mismatch"]
            assert rig.refused == [[]]
    run(main())


@pytest.mark.timeout(60)
def test_a_version_that_fails_every_attempt_is_refused_then_fetched_again_later(tmp_path):
    async def main():
        async with _Rig(tmp_path, 1, attempts=2, reask_s=0.5) as rig:
            rig.relay.tamper = lambda c: [_flip(c, fix_crc=True)] if c.index == 0 else [c]
            src = _publish(tmp_path, 1)
            with capture_logs() as logs:
                await rig.offer(src)
                await _until(lambda: rig.refused[0], 30, "the version refused")
            assert rig.ready == [[]]  # never handed to the backend
            assert [e["reason"] for e in logs if e["event"] == "weights.relay_refused"] == ["digest_mismatch"]
            assert not list((tmp_path / "host0").rglob("*.part"))
            rig.relay.tamper = None  # the fault clears: the worker's own retry takes it
            await _until(lambda: rig.ready[0], 30, "the version fetched again after reask_s")
            _assert_own_copy(tmp_path, 0, rig.ready[0][0], src)
    run(main())


@pytest.mark.timeout(60)
def test_a_newer_version_supersedes_an_unfinished_transfer(tmp_path):
    async def main():
        async with _Rig(tmp_path, 1) as rig:
            rig.relay.tamper = lambda c: [] if c.version == 1 and c.index >= 1 else [c]  # v1 stalls mid-file
            await rig.offer(_publish(tmp_path, 1))
            await _until(lambda: rig.relay.chunks_sent >= 1, 30, "v1 started")
            with capture_logs() as logs:
                src = await rig.offer(_publish(tmp_path, 2))
                await _until(lambda: rig.ready[0], 30, "v2")
            assert [m.version for m in rig.ready[0]] == [2] and rig.ready[0][0].digest == src.digest
            assert [(e["version"], e["newer"]) for e in logs if e["event"] == "weights.relay_superseded"] == [(1, 2)]
            assert not list((tmp_path / "host0").rglob("*v1*"))  # the partial v1 is gone
    run(main())


@pytest.mark.timeout(90)
def test_rollout_workers_take_relayed_versions_and_one_joining_mid_run_gets_the_latest(tmp_path):
    """The coordinator's RolloutWorkers with a relay, and real RolloutWorkers (simulated generation) on their own
    local folders: versions reach the first worker, the one that joins later gets the newest, older files go."""
    cfg = RunConfig()

    def worker(i: int, hub: Hub) -> RolloutWorker:
        peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=i, pid=os.getpid()), heartbeat_s=0.2)
        return RolloutWorker(peer, sim.build(cfg, None, i), worker_id=i, max_batch_samples=4, capture_routes=False,
                             relay_dir=str(tmp_path / f"host{i}"))

    async def main():
        hub = Hub(heartbeat_s=0.2)
        await hub.start()
        workers = RolloutWorkers(hub, [], relay=WeightRelay(hub, chunk_bytes=CHUNK))
        reported: dict[str, list[int]] = {}

        async def coordinator():
            while True:
                peer_id, msg = await hub.recv()
                match msg:
                    case Hello():
                        await workers.join(peer_id)
                    case FetchWeights():
                        await workers.relay.serve(peer_id, msg)
                    case WeightsLoaded():
                        reported.setdefault(peer_id, []).append(msg.version)
                        workers.loaded(peer_id, msg)

        pump = asyncio.create_task(coordinator())
        first = worker(0, hub)
        serving = [asyncio.create_task(first.serve())]
        try:
            await _until(lambda: len(workers.peers) == 1, 10, "worker 0 joined")
            for v in (1, 2):
                await workers.broadcast(_publish(tmp_path, v))
                await asyncio.wait_for(workers.wait_weights(v), 30)
            second = worker(1, hub)
            serving.append(asyncio.create_task(second.serve()))
            await _until(lambda: len(workers.peers) == 2, 10, "worker 1 joined")
            await asyncio.wait_for(workers.wait_weights(2), 30)  # the joiner was offered the newest version
            assert first.version == second.version == 2
            assert reported[workers.peers[0]] == [1, 2] and reported[workers.peers[1]] == [2]
            for i in range(2):
                files = [p for p in (tmp_path / f"host{i}").rglob("*") if p.is_file()]
                assert [p.name for p in files] == ["policy_v2.safetensors"]
                assert files[0].read_bytes() == (tmp_path / "learner" / "policy_v2.safetensors").read_bytes()
            for peer_id in workers.peers:
                await hub.send(peer_id, Shutdown())
            await asyncio.wait_for(asyncio.gather(*serving), 10)
            assert not any(p.is_file() for p in tmp_path.glob("host*/**/*"))
        finally:
            pump.cancel()
            for t in serving:
                t.cancel()
            await asyncio.gather(pump, *serving, return_exceptions=True)
            workers.relay.close()
            await hub.close()
    run(main())
