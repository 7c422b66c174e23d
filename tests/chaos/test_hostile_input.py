"""Hostile and broken input against a real Hub on 127.0.0.1: every kind of bad frame is rejected with its reason
and counted, the hub keeps serving a real peer, memory stays bounded; CURVE lets only authorized keys in."""

import asyncio
import collections
import os

import pytest

from transport import Hello, Hub, Peer, Scored, run
from transport.curve import client_keys, generate, server_keys
from transport.hostile import KINDS, attack, replay_hello, rss_mb, tcp_garbage

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

MAX_FRAME = 64 * 1024
FLOOD = 300  # messages of each kind in the memory test
RSS_GROWTH_BOUND_MB = 64  # for FLOOD x every kind; the largest frames are 128 KiB (2 x MAX_FRAME)


async def _round_trip(hub: Hub, peer: Peer, peer_id: str, n: int) -> None:
    """The hub still serves: a message each way."""
    await peer.send(Scored(sample_key=f"k{n}", reward=1.0, valid=True))
    assert await hub.recv(timeout=10) == (peer_id, Scored(sample_key=f"k{n}", reward=1.0, valid=True))
    await hub.send(peer_id, Scored(sample_key=f"back{n}", reward=0.0, valid=True))
    assert await peer.recv(timeout=10) == Scored(sample_key=f"back{n}", reward=0.0, valid=True)


async def _hub_with_peer(**kw) -> tuple[Hub, Peer, str]:
    hub = Hub(heartbeat_s=0.2, max_frame_bytes=MAX_FRAME, **kw)
    await hub.start()
    peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=0, pid=os.getpid()), heartbeat_s=0.2,
                max_frame_bytes=MAX_FRAME)
    await peer.start()
    peer_id, _ = await hub.recv(timeout=10)
    return hub, peer, peer_id


async def _wait_rejected(hub: Hub, reason: str, at_least: int, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while hub.rejected[reason] < at_least:
            await asyncio.sleep(0.02)


async def _replay_until_counted(hub: Hub, at_least: int, timeout: float = 30.0) -> None:
    """Replay the dead peer's Hello until the hub counts it. Until the hub's ROUTER has seen the old connection
    close (slow on a loaded machine), ZeroMQ itself drops a connection that reuses a routing id in use, so the
    replay never reaches the hub's checks: refused too, but not counted. Each retry is one more replay."""
    async with asyncio.timeout(timeout):
        while hub.rejected["replayed"] < at_least:
            await asyncio.to_thread(replay_hello, hub.endpoint, role="rollout", worker_id=0, pid=os.getpid())
            try:
                await _wait_rejected(hub, "replayed", at_least, timeout=1.0)
            except TimeoutError:
                continue


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_bad_frame_is_rejected_counted_and_the_hub_keeps_serving(kind):
    async def main():
        hub, peer, peer_id = await _hub_with_peer()
        try:
            reason = await asyncio.to_thread(attack, hub.endpoint, kind, count=3, max_frame_bytes=MAX_FRAME)
            if reason is not None:
                await _wait_rejected(hub, reason, 3)
                assert sum(hub.rejected.values()) == 3, hub.rejected  # exactly these, nothing else
            else:  # over ZeroMQ's MAXMSGSIZE: the connection is dropped before anything is buffered
                await asyncio.sleep(0.5)
                assert sum(hub.rejected.values()) == 0, hub.rejected
            await _round_trip(hub, peer, peer_id, 1)
            assert hub.peers.keys() == {peer_id}  # no attacker got in
        finally:
            await peer.close()
            await hub.close()

    run(main())


def test_replays_are_rejected_on_the_same_connection_and_from_a_retired_peer():
    async def main():
        hub, peer, peer_id = await _hub_with_peer()
        try:
            await _round_trip(hub, peer, peer_id, 1)
            peer._send_seq -= 1  # the next frame reuses the last sequence number: a replay on this connection
            await peer.send(Scored(sample_key="replayed", reward=1.0, valid=True))
            await _wait_rejected(hub, "replayed", 1)
            peer._send_seq += 1
            await _round_trip(hub, peer, peer_id, 2)  # the connection goes on
            await peer.close()
            hub.forget(peer_id)  # the coordinator declared it dead (engine/coordinator/cluster.py)
            await _replay_until_counted(hub, at_least=2)
            assert hub.peers == {}  # the replayed Hello did not bring the dead peer back
        finally:
            await hub.close()

    run(main())


def test_a_replay_to_the_next_hub_of_the_run_is_rejected_too():
    """A learner recovery binds a new hub on the same port. Given the run's retired peers (the coordinator's
    ``Faults.retired_peers``), it refuses the replayed Hello of a peer that the hub before it still held at close."""
    async def main():
        retired = collections.OrderedDict()
        hub, peer, peer_id = await _hub_with_peer(retired=retired)
        port = int(hub.endpoint.rsplit(":", 1)[1])
        await _round_trip(hub, peer, peer_id, 1)
        await peer.close()
        await hub.close()
        assert peer_id in retired
        hub = Hub(heartbeat_s=0.2, max_frame_bytes=MAX_FRAME, port=port, retired=retired)
        await hub.start()
        try:
            await _replay_until_counted(hub, at_least=1)
            assert hub.peers == {}
        finally:
            await hub.close()

    run(main())


def test_port_scanner_bytes_are_counted_as_bad_handshakes_and_an_http_client_gets_nowhere():
    async def main():
        hub, peer, peer_id = await _hub_with_peer()
        try:
            for seed in range(3):
                await asyncio.to_thread(tcp_garbage, hub.endpoint, seed=seed)
            await _wait_rejected(hub, "bad_handshake", 3)
            await asyncio.to_thread(tcp_garbage, hub.endpoint, zmtp_signature=False)  # read as ZMTP 1.0 frames
            await _round_trip(hub, peer, peer_id, 1)
            assert hub.peers.keys() == {peer_id}
        finally:
            await peer.close()
            await hub.close()

    run(main())


def test_a_flood_of_every_bad_kind_keeps_memory_bounded():
    async def main():
        hub, peer, peer_id = await _hub_with_peer()
        try:
            await asyncio.to_thread(attack, hub.endpoint, "garbage", count=50, max_frame_bytes=MAX_FRAME)
            before = rss_mb()
            counted = 0
            for kind in KINDS:
                if await asyncio.to_thread(attack, hub.endpoint, kind, count=FLOOD, max_frame_bytes=MAX_FRAME,
                                           seed=1):
                    counted += FLOOD
            await _wait_rejected_total(hub, counted + 50)
            growth = rss_mb() - before
            assert growth < RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.1f} MiB flooding {counted} bad frames"
            await _round_trip(hub, peer, peer_id, 1)
        finally:
            await peer.close()
            await hub.close()

    run(main())


async def _wait_rejected_total(hub: Hub, n: int, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while sum(hub.rejected.values()) < n:
            await asyncio.sleep(0.05)


def test_curve_admits_an_authorized_key_and_refuses_a_wrong_one_or_plaintext(tmp_path):
    generate(tmp_path / "keys")
    generate(tmp_path / "other")  # a second, unrelated key set: its client is not authorized by the first

    async def main():
        hub = Hub(heartbeat_s=0.2, curve=server_keys(tmp_path / "keys"))
        await hub.start()
        good = Peer(hub.endpoint, hello=Hello(role="reward", worker_id=0, pid=1), heartbeat_s=0.2,
                    curve=client_keys(tmp_path / "keys"))
        stranger = client_keys(tmp_path / "other")  # its own pair, and it trusts the real server key
        stranger = type(stranger)(public=stranger.public, secret=stranger.secret,
                                  server_public=server_keys(tmp_path / "keys").public)
        bad = Peer(hub.endpoint, hello=Hello(role="reward", worker_id=1, pid=2), heartbeat_s=0.2, curve=stranger)
        plain = Peer(hub.endpoint, hello=Hello(role="reward", worker_id=2, pid=3), heartbeat_s=0.2)
        try:
            for p in (bad, plain, good):
                await p.start()
            peer_id, hello = await hub.recv(timeout=10)
            assert hello == good.hello
            await _round_trip(hub, good, peer_id, 1)
            await _wait_rejected(hub, "auth_failed", 1)
            await asyncio.sleep(1.0)
            assert list(hub.peers) == [peer_id]  # neither the wrong key nor plaintext ever got a frame in
            assert hub.rejected["auth_failed"] >= 1 and hub.rejected["bad_handshake"] >= 1, hub.rejected
        finally:
            for p in (good, bad, plain):
                await p.close()
            await hub.close()

    run(main())


def test_non_loopback_bind_needs_curve_or_an_explicit_insecure_flag():
    from configs.schema import TransportConfig

    with pytest.raises(ValueError, match="transport.host.*transport.curve_keys_dir"):
        TransportConfig(host="0.0.0.0")
    assert TransportConfig(host="0.0.0.0", insecure=True).insecure
    assert TransportConfig(host="0.0.0.0", curve_keys_dir="keys").curve_keys_dir == "keys"
    assert TransportConfig(host="::1").host == "::1" and TransportConfig(host="localhost")
    with pytest.raises(ValueError, match="needs CURVE keys"):
        Hub(host="0.0.0.0")  # refused before any socket is bound


def test_a_hello_naming_a_child_from_another_process_is_refused(tmp_path):
    """The supervisor knows each child's pid: a Hello for ``reward-0`` from another pid (a replay that got past the
    hub, or a forged Hello) is refused and forgotten, so it neither takes work nor replaces the real worker; a
    worker with a name no child has (one started by hand) is not judged by pid."""
    import sys

    from engine.coordinator.cluster import Supervisor
    from engine.coordinator.procs import spawn, stop_all

    async def main():
        hub = Hub(heartbeat_s=0.2, max_frame_bytes=MAX_FRAME)
        await hub.start()
        child = spawn("reward-0", [sys.executable, "-c", "import time; time.sleep(60)"], log_dir=tmp_path)
        try:
            sup = Supervisor(hub, [child], max_restarts=1)
            forged = Hello(role="reward", worker_id=0, pid=child.popen.pid + 1)
            assert sup.impostor("reward-0-forged", forged)
            assert sup.peer_of == {}
            assert not sup.impostor("reward-0-real", Hello(role="reward", worker_id=0, pid=child.popen.pid))
            assert not sup.impostor("rollout-100-7", Hello(role="rollout", worker_id=100, pid=7))
        finally:
            stop_all([child], grace_s=0.5)
            await hub.close()

    run(main())
