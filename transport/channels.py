"""Async ZeroMQ channels on uvloop: the coordinator's ``Hub`` (ROUTER) and one ``Peer`` per actor (DEALER).

Every frame is one ``codec`` message. Each side runs two background tasks: a receive loop that decodes frames
into an inbox, and a heartbeat sender. A bad frame is dropped, counted in ``rejected[reason]`` and logged as
``transport.frame_rejected``; it never stops the receive loop. If a background task dies anyway, the next
``recv()`` raises. Liveness: any valid frame counts; an actor's ``Peer.recv()`` raises ``PeerLost`` once the
hub has been silent for ``peer_timeout_s``, so actors of a dead coordinator exit by themselves.
Actors run blocking work (torch) in ``asyncio.to_thread`` so that heartbeats keep flowing.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass

import structlog
import uvloop
import zmq
import zmq.asyncio

from transport.codec import DEFAULT_MAX_FRAME_BYTES, FrameError, decode, encode
from transport.messages import Heartbeat, Hello

log = structlog.get_logger("transport")

_STOP = object()  # put in an inbox to wake a waiting recv() when a background task dies or the channel closes


def run(coro):
    """Run ``coro`` on a fresh uvloop event loop; the entry point of every everyprompt process."""
    return uvloop.run(coro)


class PeerLost(RuntimeError):
    """The other end has been silent for longer than ``peer_timeout_s``."""


@dataclass
class PeerInfo:
    peer_id: str
    role: str
    worker_id: int
    pid: int
    last_seen: float  # time.monotonic() of the last valid frame from this peer


class _Channel:
    """One socket, an inbox filled by a receive loop, background tasks whose failure surfaces in recv()."""

    def __init__(self, socket_type: int, *, heartbeat_s: float, peer_timeout_s: float, max_frame_bytes: int,
                 hwm: int):
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.rejected: collections.Counter[str] = collections.Counter()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(socket_type)
        for option, value in ((zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm), (zmq.LINGER, 0)):
            self._sock.setsockopt(option, value)
        self._inbox: asyncio.Queue = asyncio.Queue(maxsize=hwm)  # full -> stop reading -> zmq HWM pushes back
        self._tasks: list[asyncio.Task] = []
        self._failure: BaseException | None = None
        self._closed = False

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task) -> None:
        if self._closed:
            return
        # Only close() may stop these loops: a return or an outside cancel is a crash too.
        if task.cancelled():
            self._failure = RuntimeError("cancelled outside close()")
        else:
            self._failure = task.exception() or RuntimeError("returned")
        log.error("transport.task_failed", task=task.get_name(), error=repr(self._failure))
        if not self._inbox.full():  # when full, recv() is not waiting and checks _failure first
            self._inbox.put_nowait(_STOP)

    def _check(self) -> None:
        if self._failure is not None:
            name = type(self).__name__
            raise RuntimeError(f"{name} background task died: {self._failure!r}") from self._failure
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _unwrap(self, item):
        if item is _STOP:
            self._check()
        return item

    def _decode(self, frame, peer: str):
        try:
            return decode(frame, max_frame_bytes=self.max_frame_bytes)
        except FrameError as e:
            self._reject(e.reason, peer, str(e))
            return None

    def _reject(self, reason: str, peer: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("transport.frame_rejected", reason=reason, peer=peer, detail=detail)

    async def close(self) -> None:
        """Stop the background tasks and drop unsent frames (linger 0). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.destroy(linger=0)
        if not self._inbox.full():
            self._inbox.put_nowait(_STOP)


class Hub(_Channel):
    """Coordinator side: a ROUTER bound on ``host:port`` that every actor's ``Peer`` connects to.

    Consumes: frames from peers. A peer must send ``Hello`` first; frames from peers that have not are dropped
    as ``unknown_peer``. Produces: ``(peer_id, message)`` from ``recv()`` (Hello included, Heartbeats not),
    and a Heartbeat to every known peer every ``heartbeat_s``. ``peer_id`` is the peer's routing id as text.
    Call ``recv()`` steadily: while the inbox is full (``hwm`` messages) frames, heartbeats included, wait.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, heartbeat_s: float = 1.0,
                 peer_timeout_s: float = 60.0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 hwm: int = 10000):
        super().__init__(zmq.ROUTER, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s,
                         max_frame_bytes=max_frame_bytes, hwm=hwm)
        self.host, self.port = host, port
        self.endpoint = ""  # "tcp://host:port", set by start()
        self.peers: dict[str, PeerInfo] = {}
        self._joined = asyncio.Event()  # replaced after each set(), so waiters wake once per Hello

    async def start(self) -> None:
        if self.port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{self.host}")
        else:
            self._sock.bind(f"tcp://{self.host}:{self.port}")
        self.endpoint = f"tcp://{self.host}:{self.port}"
        self._spawn(self._receive_loop(), "hub.receive")
        self._spawn(self._heartbeat_loop(), "hub.heartbeat")
        log.info("transport.hub_started", endpoint=self.endpoint)

    async def recv(self, timeout: float | None = None) -> tuple[str, object]:
        """Next ``(peer_id, message)``; raises ``TimeoutError`` after ``timeout`` seconds."""
        self._check()
        try:
            async with asyncio.timeout(timeout):
                item = await self._inbox.get()
        except TimeoutError:
            raise TimeoutError(f"no message from any peer at {self.endpoint} within {timeout}s; "
                               f"known peers: {sorted(self.peers)}") from None
        return self._unwrap(item)

    async def send(self, peer_id: str, msg) -> None:
        """Queue ``msg`` for ``peer_id``; frames for a peer that has gone away are dropped (dead_peers())."""
        self._check()
        if peer_id not in self.peers:
            raise KeyError(f"unknown peer {peer_id!r}; known peers: {sorted(self.peers)}")
        await self._sock.send_multipart([_identity(peer_id), encode(msg)], copy=False)

    async def wait_for_peers(self, role: str, count: int, timeout: float) -> list[str]:
        """Ids of all peers of ``role`` once at least ``count`` have said Hello.

        Consumes nothing: their Hello messages still come out of ``recv()``.
        """
        ids: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._check()
                    ids = [p.peer_id for p in self.peers.values() if p.role == role]
                    if len(ids) >= count:
                        return ids
                    await self._joined.wait()
        except TimeoutError:
            raise TimeoutError(f"only {len(ids)} of {count} {role} peers connected to {self.endpoint} within "
                               f"{timeout:.0f}s; check that they started and see their logs") from None

    def forget(self, peer_id: str) -> None:
        """Drop a peer the caller declared gone: no more heartbeats to it, and its frames count as unknown."""
        self.peers.pop(peer_id, None)

    def dead_peers(self) -> list[str]:
        """Peers silent for longer than ``peer_timeout_s``."""
        now = time.monotonic()
        return [p.peer_id for p in self.peers.values() if now - p.last_seen > self.peer_timeout_s]

    async def _receive_loop(self) -> None:
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            peer_id = _peer_id(parts[0].bytes)
            if len(parts) != 2:
                self._reject("bad_envelope", peer_id, f"{len(parts)} parts, expected [identity, payload]")
                continue
            msg = self._decode(parts[1], peer_id)
            if msg is None:
                continue
            if isinstance(msg, Hello):
                self.peers[peer_id] = PeerInfo(peer_id, msg.role, msg.worker_id, msg.pid, time.monotonic())
                self._joined.set()
                self._joined = asyncio.Event()
                log.info("transport.peer_joined", peer=peer_id, role=msg.role, worker_id=msg.worker_id,
                         pid=msg.pid)
            elif peer_id in self.peers:
                self.peers[peer_id].last_seen = time.monotonic()
            else:
                self._reject("unknown_peer", peer_id, f"{type(msg).__name__} before Hello")
                continue
            if not isinstance(msg, Heartbeat):
                await self._inbox.put((peer_id, msg))

    async def _heartbeat_loop(self) -> None:
        while True:
            frame = encode(Heartbeat(sent_at=time.time()))
            for peer_id in list(self.peers):  # ROUTER drops frames for gone peers instead of blocking
                await self._sock.send_multipart([_identity(peer_id), frame])
            await asyncio.sleep(self.heartbeat_s)


class Peer(_Channel):
    """Actor side: a DEALER connected to the hub at ``endpoint``, routing id "{role}-{worker_id}-{pid}".

    Consumes: messages from the hub (``recv()``, Heartbeats filtered out). Produces: ``hello`` on start, then
    ``send()``s and a Heartbeat every ``heartbeat_s``. ``recv()`` and ``send()`` raise ``PeerLost`` once
    nothing has come from the hub for ``peer_timeout_s``. Use it from the event loop's thread only, never from
    an ``asyncio.to_thread`` worker.
    """

    def __init__(self, endpoint: str, *, hello: Hello, heartbeat_s: float = 1.0, peer_timeout_s: float = 60.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, hwm: int = 10000):
        super().__init__(zmq.DEALER, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s,
                         max_frame_bytes=max_frame_bytes, hwm=hwm)
        self.endpoint = endpoint
        self.hello = hello
        self.peer_id = f"{hello.role}-{hello.worker_id}-{hello.pid}"
        self._sock.setsockopt(zmq.ROUTING_ID, self.peer_id.encode())
        self._last_heard = time.monotonic()

    async def start(self) -> None:
        self._sock.connect(self.endpoint)
        self._last_heard = time.monotonic()
        await self._sock.send(encode(self.hello))
        self._spawn(self._receive_loop(), "peer.receive")
        self._spawn(self._heartbeat_loop(), "peer.heartbeat")

    async def recv(self, timeout: float | None = None) -> object:
        """Next message from the hub; TimeoutError after ``timeout`` s, PeerLost if the hub went silent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check()
            if not self._inbox.empty():
                return self._unwrap(self._inbox.get_nowait())
            self._check_alive()
            now = time.monotonic()
            wait = self.peer_timeout_s - (now - self._last_heard) + 0.01
            if deadline is not None:
                if now >= deadline:
                    raise TimeoutError(f"no message from the hub at {self.endpoint} within {timeout}s")
                wait = min(wait, deadline - now)
            try:
                return self._unwrap(await asyncio.wait_for(self._inbox.get(), wait))
            except TimeoutError:
                continue

    async def send(self, msg) -> None:
        self._check()
        self._check_alive()
        await self._sock.send(encode(msg), copy=False)

    def _check_alive(self) -> None:
        silent_s = time.monotonic() - self._last_heard
        if silent_s > self.peer_timeout_s:
            raise PeerLost(f"nothing from the hub at {self.endpoint} for {silent_s:.1f}s (peer_timeout_s="
                           f"{self.peer_timeout_s}); the coordinator exited or hung, see its log")

    async def _receive_loop(self) -> None:
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            if len(parts) != 1:
                self._reject("bad_envelope", "hub", f"{len(parts)} parts, expected [payload]")
                continue
            msg = self._decode(parts[0], "hub")
            if msg is None:
                continue
            self._last_heard = time.monotonic()
            if not isinstance(msg, Heartbeat):
                await self._inbox.put(msg)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._sock.send(encode(Heartbeat(sent_at=time.time())))


def _peer_id(identity: bytes) -> str:
    """Routing id -> text: printable ASCII as is, anything else (ZMQ's generated ids) as "0x<hex>"."""
    if identity.isascii() and identity.decode().isprintable() and not identity.startswith(b"0x"):
        return identity.decode()
    return "0x" + identity.hex()


def _identity(peer_id: str) -> bytes:
    return bytes.fromhex(peer_id[2:]) if peer_id.startswith("0x") else peer_id.encode()
