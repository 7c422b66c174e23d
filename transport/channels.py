"""Async ZeroMQ channels on uvloop: the coordinator's ``Hub`` (ROUTER) and one ``Peer`` per actor (DEALER).

Every frame is one ``codec`` message, preceded by its sequence number: the envelope is ``[seq, payload]``
(``[identity, seq, payload]`` at the ROUTER), seq an 8-byte big-endian counter per connection and direction.
Each side runs two background tasks: a receive loop that decodes frames into an inbox, and a heartbeat sender.
A bad frame is dropped, counted in ``rejected[reason]`` and logged as ``transport.frame_rejected``; it never
stops the receive loop (the log line has the running count; after the first 20 of a reason only every
2^k-th one is logged, so a flood cannot fill the disk). Reasons: the codec's (malformed, too_large, too_deep,
protocol_version, unknown_type, bad_fields, bad_array), plus bad_envelope, unknown_peer (a frame before Hello),
replayed (a sequence number not above the last one seen from that peer, including a replayed Hello of a peer
that is gone), too_many_peers, and at the hub's socket auth_failed / bad_handshake (CURVE or ZMTP handshake
refused: a wrong key, a port scanner).
If a background task dies anyway, the next ``recv()`` raises. Liveness: any valid frame counts; an actor's
``Peer.recv()`` raises ``PeerLost`` once the hub has been silent for ``peer_timeout_s``, so actors of a dead
coordinator exit by themselves. Actors run blocking work (torch) in ``asyncio.to_thread`` so heartbeats flow.

Memory is bounded: at most ``hwm`` frames wait in each ZeroMQ queue and in the inbox (a full inbox stops the
receive loop, and ZeroMQ's high-water mark then blocks the senders: backpressure, not growth); a frame over
``max_frame_bytes`` is rejected by the codec before parsing, and one over twice that is refused by ZeroMQ
itself (``MAXMSGSIZE``: the connection is dropped before the frame is buffered). Binding anything but loopback
needs CURVE keys (transport/curve.py) or ``insecure=True``, which logs a warning.

The module is over 400 lines on purpose: Hub and Peer share one base class (sequence numbers, heartbeats,
rejection accounting) whose invariants are easier to check in one file than across several.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
import time
from dataclasses import dataclass

import structlog
import uvloop
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from transport.codec import DEFAULT_MAX_FRAME_BYTES, FrameError, decode, encode
from transport.curve import CurveKeys, is_loopback
from transport.messages import Heartbeat, Hello

log = structlog.get_logger("transport")

_STOP = object()  # put in an inbox to wake a waiting recv() when a background task dies or the channel closes
_SEQ = struct.Struct(">Q")
_LOG_FIRST = 20  # rejected frames logged one by one per reason; after that only the 2^k-th (with its count)
_MAX_RETIRED = 4096  # forgotten peers whose last sequence number is remembered (a replayed Hello is refused)
_HANDSHAKE_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed",
                     zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "bad_handshake",
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "bad_handshake"}


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
    last_seq: int = 0  # sequence number of that frame: a frame not above it is a replay


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
        for option, value in ((zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm), (zmq.LINGER, 0),
                              (zmq.MAXMSGSIZE, 2 * max_frame_bytes)):
            self._sock.setsockopt(option, value)
        self._inbox: asyncio.Queue = asyncio.Queue(maxsize=hwm)  # full -> stop reading -> zmq HWM pushes back
        self.inbox_peak = 0  # most frames waiting in the inbox since the last load() call
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

    def _seq(self, part, peer: str) -> int | None:
        if len(part) != _SEQ.size:
            self._reject("bad_envelope", peer, f"sequence number of {len(part)} bytes, expected {_SEQ.size}")
            return None
        return _SEQ.unpack(part.bytes if hasattr(part, "bytes") else part)[0]

    async def _put(self, item) -> None:
        await self._inbox.put(item)
        self.inbox_peak = max(self.inbox_peak, self._inbox.qsize())

    def load(self) -> dict[str, int]:
        """Counters for metrics.jsonl: frames rejected so far (all reasons), and the inbox peak since the last
        call (at ``hwm`` the receive loop is pausing and senders are being pushed back)."""
        peak, self.inbox_peak = self.inbox_peak, self._inbox.qsize()
        return {"frames_rejected": sum(self.rejected.values()), "inbox_peak": peak}

    def _reject(self, reason: str, peer: str, detail: str) -> None:
        self.rejected[reason] += 1
        n = self.rejected[reason]
        if n <= _LOG_FIRST or n & (n - 1) == 0:  # a flood must not fill the disk: then only the 2^k-th one
            log.warning("transport.frame_rejected", reason=reason, peer=peer, detail=detail, count=n)

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
                 hwm: int = 10000, curve: CurveKeys | None = None, insecure: bool = False, max_peers: int = 1024,
                 retired: collections.OrderedDict[str, int] | None = None):
        if not is_loopback(host) and curve is None and not insecure:
            raise ValueError(f"binding {host} (not loopback) needs CURVE keys: generate them with `python -m "
                             "transport.keys DIR` and pass transport.curve_keys_dir=DIR, or pass "
                             "transport.insecure=true to accept unauthenticated peers")
        super().__init__(zmq.ROUTER, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s,
                         max_frame_bytes=max_frame_bytes, hwm=hwm)
        self.host, self.port, self.curve, self.max_peers = host, port, curve, max_peers
        self.endpoint = ""  # "tcp://host:port", set by start()
        self.peers: dict[str, PeerInfo] = {}
        # forgotten peer -> its last seq; pass the same ``retired`` to the next hub of a run (one that replaces a
        # closed one, on the same port) so a replayed Hello of a peer retired before stays refused
        self._retired = retired if retired is not None else collections.OrderedDict()
        self._send_seq: dict[str, int] = {}
        self._joined = asyncio.Event()  # replaced after each set(), so waiters wake once per Hello
        self._auth: AsyncioAuthenticator | None = None
        if curve is not None:
            self._sock.curve_secretkey, self._sock.curve_publickey = curve.secret, curve.public
            self._sock.curve_server = True

    async def start(self) -> None:
        if self.curve is not None:  # ZAP: only clients whose public key is in authorized_dir get through
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self.curve.authorized_dir)
        elif not is_loopback(self.host):
            log.warning("transport.insecure_bind", host=self.host,
                        detail="no CURVE keys: anyone who can reach this port can join the run and send frames")
        monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._spawn(self._monitor_loop(monitor), "hub.monitor")
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

    async def send(self, peer_id: str, msg) -> bool:
        """Queue ``msg`` for ``peer_id``; False, and nothing sent, for a peer forgotten since the caller chose it
        (``forget``: its loss is on the way to the caller, which re-queues the work then). A peer this hub never
        knew is a bug: KeyError. ZeroMQ drops frames for a peer that vanished without being forgotten."""
        self._check()
        if peer_id not in self.peers:
            if peer_id in self._retired:
                return False
            raise KeyError(f"unknown peer {peer_id!r}; known peers: {sorted(self.peers)}")
        await self._sock.send_multipart([_identity(peer_id), self._next_seq(peer_id), encode(msg)], copy=False)
        return True

    def _next_seq(self, peer_id: str) -> bytes:
        self._send_seq[peer_id] = n = self._send_seq.get(peer_id, 0) + 1
        return _SEQ.pack(n)

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
        """Drop a peer the caller declared gone: no more heartbeats to it, and its frames count as unknown (a
        replay of its Hello as ``replayed``)."""
        info = self.peers.pop(peer_id, None)
        self._send_seq.pop(peer_id, None)
        if info is not None:
            self._retired[peer_id] = info.last_seq
            while len(self._retired) > _MAX_RETIRED:
                self._retired.popitem(last=False)

    def dead_peers(self) -> list[str]:
        """Peers silent for longer than ``peer_timeout_s``."""
        now = time.monotonic()
        return [p.peer_id for p in self.peers.values() if now - p.last_seen > self.peer_timeout_s]

    async def _receive_loop(self) -> None:
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            peer_id = _peer_id(parts[0].bytes)
            if len(parts) != 3:
                self._reject("bad_envelope", peer_id, f"{len(parts)} parts, expected [identity, seq, payload]")
                continue
            seq = self._seq(parts[1], peer_id)
            if seq is None:
                continue
            info = self.peers.get(peer_id)
            last = info.last_seq if info is not None else self._retired.get(peer_id, 0)
            if seq <= last:  # checked before decoding: a replay costs nothing
                self._reject("replayed", peer_id, f"sequence number {seq}, last seen {last}")
                continue
            msg = self._decode(parts[2], peer_id)
            if msg is None:
                continue
            if isinstance(msg, Hello) and info is None:
                if len(self.peers) >= self.max_peers:
                    self._reject("too_many_peers", peer_id, f"{self.max_peers} peers joined already")
                    continue
                self._retired.pop(peer_id, None)
                self.peers[peer_id] = info = PeerInfo(peer_id, msg.role, msg.worker_id, msg.pid, time.monotonic())
                self._joined.set()
                self._joined = asyncio.Event()
                log.info("transport.peer_joined", peer=peer_id, role=msg.role, worker_id=msg.worker_id,
                         pid=msg.pid)
            elif info is None:
                self._reject("unknown_peer", peer_id, f"{type(msg).__name__} before Hello")
                continue
            elif isinstance(msg, Hello):
                self._reject("bad_fields", peer_id, "a second Hello on one connection")
                continue
            info.last_seen, info.last_seq = time.monotonic(), seq
            if not isinstance(msg, Heartbeat):
                await self._put((peer_id, msg))

    async def _heartbeat_loop(self) -> None:
        while True:
            frame = encode(Heartbeat(sent_at=time.time()))
            for peer_id in list(self.peers):  # ROUTER drops frames for gone peers instead of blocking
                await self._sock.send_multipart([_identity(peer_id), self._next_seq(peer_id), frame])
            await asyncio.sleep(self.heartbeat_s)

    async def _monitor_loop(self, monitor) -> None:
        """Count handshakes refused at the socket: a client with a wrong CURVE key, or bytes that are not ZMTP."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            reason = _HANDSHAKE_EVENTS.get(event["event"])
            if reason is not None:
                self._reject(reason, str(event.get("endpoint", b""), errors="replace"), f"zmq event {event['event']}")

    async def close(self) -> None:
        if self._auth is not None and not self._closed:
            self._auth.stop()
        for peer_id in list(self.peers):  # retired too: a later hub sharing ``retired`` refuses their replays
            self.forget(peer_id)
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        await super().close()


class Peer(_Channel):
    """Actor side: a DEALER connected to the hub at ``endpoint``, routing id "{role}-{worker_id}-{pid}" (with
    ``session`` k > 0: "...-{pid}.{k}", a process joining again on a new connection after it lost the hub).

    Consumes: messages from the hub (``recv()``, Heartbeats filtered out). Produces: ``hello`` on start, then
    ``send()``s and a Heartbeat every ``heartbeat_s``. ``recv()`` and ``send()`` raise ``PeerLost`` once
    nothing has come from the hub for ``peer_timeout_s``. Use it from the event loop's thread only, never from
    an ``asyncio.to_thread`` worker.
    """

    def __init__(self, endpoint: str, *, hello: Hello, heartbeat_s: float = 1.0, peer_timeout_s: float = 60.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, hwm: int = 10000, curve: CurveKeys | None = None,
                 session: int = 0):
        super().__init__(zmq.DEALER, heartbeat_s=heartbeat_s, peer_timeout_s=peer_timeout_s,
                         max_frame_bytes=max_frame_bytes, hwm=hwm)
        self.endpoint = endpoint
        self.hello = hello
        self.peer_id = f"{hello.role}-{hello.worker_id}-{hello.pid}" + (f".{session}" if session else "")
        self._sock.setsockopt(zmq.ROUTING_ID, self.peer_id.encode())
        if curve is not None:  # the hub refuses the handshake unless our public key is authorized
            self._sock.curve_secretkey, self._sock.curve_publickey = curve.secret, curve.public
            self._sock.curve_serverkey = curve.server_public
        self._last_heard = time.monotonic()
        self._send_seq = self._recv_seq = 0

    def _next_seq(self) -> bytes:
        self._send_seq += 1
        return _SEQ.pack(self._send_seq)

    async def start(self) -> None:
        self._sock.connect(self.endpoint)
        self._last_heard = time.monotonic()
        await self._sock.send_multipart([self._next_seq(), encode(self.hello)])
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
        await self._sock.send_multipart([self._next_seq(), encode(msg)], copy=False)

    @property
    def heard(self) -> bool:
        """Whether any valid frame has come from the hub on this connection (it accepted our Hello)."""
        return self._recv_seq > 0

    def _check_alive(self) -> None:
        silent_s = time.monotonic() - self._last_heard
        if silent_s > self.peer_timeout_s:
            raise PeerLost(f"nothing from the hub at {self.endpoint} for {silent_s:.1f}s (peer_timeout_s="
                           f"{self.peer_timeout_s}); the coordinator exited or hung, see its log")

    async def _receive_loop(self) -> None:
        while True:
            parts = await self._sock.recv_multipart(copy=False)
            if len(parts) != 2:
                self._reject("bad_envelope", "hub", f"{len(parts)} parts, expected [seq, payload]")
                continue
            seq = self._seq(parts[0], "hub")
            if seq is None:
                continue
            if seq <= self._recv_seq:
                self._reject("replayed", "hub", f"sequence number {seq}, last seen {self._recv_seq}")
                continue
            msg = self._decode(parts[1], "hub")
            if msg is None:
                continue
            self._last_heard, self._recv_seq = time.monotonic(), seq
            if not isinstance(msg, Heartbeat):
                await self._put(msg)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._sock.send_multipart([self._next_seq(), encode(Heartbeat(sent_at=time.time()))])


def _peer_id(identity: bytes) -> str:
    """Routing id -> text: printable ASCII as is, anything else (ZMQ's generated ids) as "0x<hex>"."""
    if identity.isascii() and identity.decode().isprintable() and not identity.startswith(b"0x"):
        return identity.decode()
    return "0x" + identity.hex()


def _identity(peer_id: str) -> bytes:
    return bytes.fromhex(peer_id[2:]) if peer_id.startswith("0x") else peer_id.encode()
