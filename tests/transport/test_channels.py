"""transport.channels: Hub and Peer over real ZMQ sockets on 127.0.0.1 and uvloop, in one process and two."""

import asyncio
import multiprocessing as mp
import os
import time

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from transport.channels import Hub, Peer, PeerInfo, PeerLost, run
from transport.codec import encode, decode
from transport.messages import (
    PROTOCOL_VERSION,
    ResponseChunk,
    GenerateRequest,
    Heartbeat,
    Hello,
    Scored,
    Shutdown,
)


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")  # the channel's sequence-number frame


def _request(n: int = 4) -> GenerateRequest:
    return GenerateRequest(group_id="g0", prompt_id=1, prompt_ids=np.arange(n, dtype=np.int32), num_samples=1,
                           max_new_tokens=n, temperature=1.0)


def _echo(req: GenerateRequest, worker_id: int) -> ResponseChunk:
    n = len(req.prompt_ids)
    return ResponseChunk(group_id=req.group_id, sample_index=0, prompt_id=req.prompt_id, offset=0,
                      token_ids=req.prompt_ids,
                      behavior_logprobs=np.zeros(n, np.float32), token_versions=np.zeros(n, np.int32),
                      finish_reason="length", worker_id=worker_id)


async def _hub_and_peer(**hub_kwargs) -> tuple[Hub, Peer, str]:
    hub = Hub(**hub_kwargs)
    await hub.start()
    peer = Peer(hub.endpoint, hello=Hello(role="rollout", worker_id=0, pid=os.getpid()), heartbeat_s=0.05,
                peer_timeout_s=hub_kwargs.get("peer_timeout_s", 60.0))
    await peer.start()
    peer_id, hello = await hub.recv(timeout=5)
    assert hello == peer.hello
    return hub, peer, peer_id


@pytest.mark.timeout(10)
def test_run_uses_uvloop():
    async def loop_module():
        return type(asyncio.get_running_loop()).__module__

    assert run(loop_module()).startswith("uvloop")


@pytest.mark.timeout(10)
def test_hello_registers_peer_and_messages_flow_both_ways():
    async def main():
        hub, peer, peer_id = await _hub_and_peer()
        try:
            assert hub.endpoint.startswith("tcp://127.0.0.1:")
            assert peer_id == f"rollout-0-{os.getpid()}" == peer.peer_id
            info = hub.peers[peer_id]
            assert (info.role, info.worker_id, info.pid) == ("rollout", 0, os.getpid())
            assert await hub.wait_for_peers("rollout", 1, timeout=1) == [peer_id]

            await hub.send(peer_id, _request(6))
            req = await peer.recv(timeout=5)
            assert isinstance(req, GenerateRequest) and req.prompt_ids.tolist() == list(range(6))
            await peer.send(_echo(req, worker_id=0))
            got_from, done = await hub.recv(timeout=5)
            assert got_from == peer_id and isinstance(done, ResponseChunk)
            assert done.token_ids.tolist() == list(range(6)) and not done.token_ids.flags.writeable

            with pytest.raises(KeyError, match="unknown peer"):
                await hub.send("nobody", Shutdown())
            hub.forget(peer_id)  # declared gone: a send chosen before the caller heard of it is dropped, no error
            assert await hub.send(peer_id, Shutdown()) is False
        finally:
            await peer.close()
            await hub.close()
            await hub.close()  # idempotent

    run(main())


@pytest.mark.timeout(10)
def test_heartbeats_keep_last_seen_fresh_and_are_not_returned():
    async def main():
        hub, peer, peer_id = await _hub_and_peer(heartbeat_s=0.05)
        try:
            first_seen = hub.peers[peer_id].last_seen
            with pytest.raises(TimeoutError):
                await hub.recv(timeout=0.4)  # only heartbeats arrive meanwhile
            with pytest.raises(TimeoutError):
                await peer.recv(timeout=0.1)
            assert hub.peers[peer_id].last_seen > first_seen
            assert hub.dead_peers() == [] and not hub.rejected and not peer.rejected
        finally:
            await peer.close()
            await hub.close()

    run(main())


@pytest.mark.timeout(10)
def test_wait_for_peers_times_out_with_a_useful_message_and_buffers_hellos():
    async def main():
        hub = Hub()
        await hub.start()
        hellos = [Hello(role="reward", worker_id=i, pid=os.getpid()) for i in range(2)]
        peers = [Peer(hub.endpoint, hello=h) for h in hellos]
        try:
            with pytest.raises(TimeoutError, match="0 of 1 reward peers"):
                await hub.wait_for_peers("reward", 1, timeout=0.1)
            for p in peers:
                await p.start()
            ids = await hub.wait_for_peers("reward", 2, timeout=5)
            assert sorted(ids) == sorted(p.peer_id for p in peers)
            hellos = [await hub.recv(timeout=1), await hub.recv(timeout=1)]  # nothing was swallowed
            assert sorted(pid for pid, _ in hellos) == sorted(ids)
        finally:
            for p in peers:
                await p.close()
            await hub.close()

    run(main())


@pytest.mark.timeout(10)
def test_hub_rejects_bad_frames_and_keeps_serving():
    async def main():
        hub = Hub(max_frame_bytes=4096)
        await hub.start()
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)  # zmq-generated (binary) routing id
        raw.connect(hub.endpoint)
        try:
            await raw.send_multipart([_seq(1), b"\xc1 not msgpack at all"])
            await raw.send_multipart([_seq(2), bytes(5000)])
            await raw.send_multipart([_seq(3), msgpack.packb([PROTOCOL_VERSION, "Nope", {}])])
            old_hello = {"role": "x", "worker_id": 0, "pid": 1}
            await raw.send_multipart([_seq(4), msgpack.packb([PROTOCOL_VERSION - 1, "Hello", old_hello])])
            await raw.send_multipart([b"", encode(Shutdown())])  # REQ-style envelope: no sequence number
            await raw.send(encode(Shutdown()))  # no sequence number at all
            await raw.send_multipart([_seq(5), encode(Heartbeat(sent_at=0.0))])  # valid, but before Hello
            await raw.send_multipart([_seq(6), encode(Hello(role="reward", worker_id=7, pid=1))])
            await raw.send_multipart([_seq(6), encode(Scored(sample_key="k", reward=1.0, valid=True))])  # replayed
            peer_id, hello = await hub.recv(timeout=5)  # frames arrive in order: the bad ones were seen first
            assert peer_id.startswith("0x") and hello.worker_id == 7
            await raw.send_multipart([_seq(7), encode(Scored(sample_key="k", reward=1.0, valid=True))])
            assert await hub.recv(timeout=5) == (peer_id, Scored(sample_key="k", reward=1.0, valid=True))
            assert hub.rejected == {"malformed": 1, "too_large": 1, "unknown_type": 1, "protocol_version": 1,
                                    "bad_envelope": 2, "unknown_peer": 1, "replayed": 1}
            await hub.send(peer_id, Shutdown(reason="bye"))
            reply = Heartbeat(sent_at=0.0)
            while isinstance(reply, Heartbeat):  # the hub heartbeats this peer now that it said Hello
                assert await raw.poll(5000), "hub did not answer after rejecting bad frames"
                _, frame = await raw.recv_multipart()  # [sequence number, payload]
                reply = decode(frame)
            assert reply == Shutdown(reason="bye")
        finally:
            raw.close(linger=0)
            ctx.term()
            await hub.close()

    run(main())


@pytest.mark.timeout(10)
def test_peer_rejects_bad_frames_from_the_hub_and_keeps_serving():
    async def main():
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        peer = Peer(f"tcp://127.0.0.1:{port}", hello=Hello(role="learner", worker_id=0, pid=1))
        await peer.start()
        try:
            assert await router.poll(5000)
            ident, seq, hello = await router.recv_multipart()
            assert decode(hello) == peer.hello and ident == b"learner-0-1" and seq == _seq(1)
            await router.send_multipart([ident, _seq(1), b"\x92garbage"])
            await router.send_multipart([ident, b"a", b"b"])
            await router.send_multipart([ident, encode(Shutdown())])  # no sequence number
            await router.send_multipart([ident, _seq(2), encode(Scored(sample_key="k", reward=1.0, valid=True))])
            await router.send_multipart([ident, _seq(2), encode(Shutdown())])  # replayed
            await router.send_multipart([ident, _seq(3), encode(Shutdown(reason="after"))])
            assert await peer.recv(timeout=5) == Scored(sample_key="k", reward=1.0, valid=True)
            assert await peer.recv(timeout=5) == Shutdown(reason="after")
            assert peer.rejected == {"malformed": 1, "bad_envelope": 2, "replayed": 1}
        finally:
            await peer.close()
            router.close(linger=0)
            ctx.term()

    run(main())


@pytest.mark.timeout(10)
def test_peer_raises_peer_lost_when_the_hub_goes_away():
    async def main():
        hub, peer, _ = await _hub_and_peer(heartbeat_s=0.05, peer_timeout_s=1.0)
        try:
            await hub.close()
            with pytest.raises(PeerLost, match="nothing from the hub"):  # long before the recv timeout
                await peer.recv(timeout=10)
            with pytest.raises(PeerLost):
                await peer.send(Shutdown())
        finally:
            await peer.close()

    run(main())


@pytest.mark.timeout(10)
def test_dead_peers_reports_a_silent_peer():
    async def main():
        hub, peer, peer_id = await _hub_and_peer(heartbeat_s=0.05, peer_timeout_s=0.5)
        try:
            assert hub.dead_peers() == []
            await peer.close()
            deadline = time.monotonic() + 5
            while hub.dead_peers() != [peer_id]:
                assert time.monotonic() < deadline, "silent peer never reported dead"
                await asyncio.sleep(0.05)
        finally:
            await hub.close()

    run(main())


def _break_socket(hub: Hub) -> None:
    hub._sock.close(linger=0)  # the receive loop's pending recv is cancelled under it


def _break_heartbeats(hub: Hub) -> None:
    # Not a valid routing id: the heartbeat sender raises ValueError when it gets to it.
    hub.peers["0xnot-hex"] = PeerInfo("0xnot-hex", "rollout", 9, 1, time.monotonic())


@pytest.mark.timeout(10)
@pytest.mark.parametrize("breaker", [_break_socket, _break_heartbeats], ids=lambda f: f.__name__)
def test_a_crashed_background_task_surfaces_on_recv(breaker):
    async def main():
        hub, peer, _ = await _hub_and_peer(heartbeat_s=0.05)
        try:
            breaker(hub)
            with pytest.raises(RuntimeError, match="background task died"):
                await hub.recv(timeout=5)
            with pytest.raises(RuntimeError, match="background task died"):
                await hub.recv(timeout=5)  # and keeps failing, never hangs
        finally:
            await peer.close()
            await hub.close()
        with pytest.raises(RuntimeError, match="closed"):
            await peer.recv(timeout=1)

    run(main())


# ---- a Peer in a child process -------------------------------------------------------------------------

BUSY_S = 1.5  # the child's "generation" time, longer than the hub's peer_timeout_s below


def _busy_echo(req: GenerateRequest, seconds: float) -> ResponseChunk:
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:  # pure-Python CPU work: holds the GIL like a slow torch step would
        total += sum(range(1000))
    return _echo(req, worker_id=1)


async def _echo_actor(endpoint: str) -> None:
    peer = Peer(endpoint, hello=Hello(role="rollout", worker_id=1, pid=os.getpid()), heartbeat_s=0.05,
                peer_timeout_s=10.0)
    await peer.start()
    try:
        while not isinstance(msg := await peer.recv(timeout=20), Shutdown):
            await peer.send(await asyncio.to_thread(_busy_echo, msg, BUSY_S))
    finally:
        await peer.close()


def run_echo_actor(endpoint: str) -> None:
    """Child-process entry point (spawn: must be importable)."""
    run(_echo_actor(endpoint))


@pytest.mark.timeout(30)
def test_peer_in_child_process_answers_and_heartbeats_while_working_in_a_thread():
    async def main(proc_holder):
        hub = Hub(heartbeat_s=0.05, peer_timeout_s=1.0)
        await hub.start()
        proc = mp.get_context("spawn").Process(target=run_echo_actor, args=(hub.endpoint,))
        proc_holder.append(proc)
        proc.start()
        try:
            (peer_id,) = await hub.wait_for_peers("rollout", 1, timeout=20)
            assert hub.peers[peer_id].pid == proc.pid
            assert isinstance((await hub.recv(timeout=1))[1], Hello)
            await hub.send(peer_id, _request(5))
            reply = asyncio.ensure_future(hub.recv(timeout=20))
            seen_dead = []
            while not reply.done():  # the child is busy in to_thread for BUSY_S > peer_timeout_s
                seen_dead += hub.dead_peers()
                await asyncio.sleep(0.05)
            got_from, done = reply.result()
            assert got_from == peer_id and done.token_ids.tolist() == [0, 1, 2, 3, 4] and done.worker_id == 1
            assert seen_dead == [], "heartbeats stopped while the child worked in a thread"
            await hub.send(peer_id, Shutdown(reason="test over"))
            await asyncio.to_thread(proc.join, 10)
            assert proc.exitcode == 0
        finally:
            await hub.close()

    procs = []
    try:
        run(main(procs))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()  # our own child, by handle
                proc.join(5)
