"""Hostile and broken input for a running hub: the chaos tests and ``everyprompt-bench chaos`` use these.

Each ``KINDS`` entry builds the frames an attacker (or a broken peer) would send, and names the reason the hub
must count for each (``Hub.rejected``). ``attack()`` sends them from a fresh DEALER connection, the way a port
scanner or a stale process on the same machine would reach the coordinator. Blocking (plain zmq); call it from a
thread or another process. Lives in transport/ because only transport/ touches zmq and msgpack.
"""

from __future__ import annotations

import os
import socket
import time

import msgpack
import numpy as np
import zmq

from transport.codec import encode
from transport.messages import PROTOCOL_VERSION, Hello, ResponseChunk

_SEQ = (1).to_bytes(8, "big")


def _chunk() -> bytes:
    n = 8
    return encode(ResponseChunk(group_id="g1", sample_index=0, prompt_id=1, offset=0,
                                token_ids=np.arange(n, dtype=np.int32), behavior_logprobs=np.zeros(n, np.float32),
                                token_versions=np.zeros(n, np.int32)))


def _deep(depth: int) -> bytes:  # [version, "Scored", {"sample_key": [[[[...]]]]}]
    head = b"\x93" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("Scored") + b"\x81" + msgpack.packb("sample_key")
    return head + b"\x91" * depth + b"\xc0"


def frames(kind: str, *, max_frame_bytes: int, rng: np.random.Generator) -> tuple[list[list[bytes]], str | None]:
    """``kind`` -> (multipart messages to send, reason the hub counts for each; None = not counted: ZeroMQ
    drops the connection before the hub sees a frame)."""
    if kind == "truncated":
        c = _chunk()
        return [[_SEQ, c[: int(rng.integers(1, len(c) - 1))]]], "malformed"
    if kind == "garbage":
        return [[_SEQ, b"\xc1" + rng.bytes(int(rng.integers(0, 512)))]], "malformed"
    if kind == "oversized":
        return [[_SEQ, bytes(max_frame_bytes + 1)]], "too_large"
    if kind == "beyond_max_msg_size":
        return [[_SEQ, bytes(2 * max_frame_bytes + 1)]], None
    if kind == "deeply_nested":
        return [[_SEQ, _deep(20_000)]], "too_deep"  # msgpack refuses nesting deeper than 1024
    if kind == "wrong_type":
        return [[_SEQ, msgpack.packb([PROTOCOL_VERSION, "Scored", {"sample_key": 7, "reward": "x", "valid": 1}])]], \
            "bad_fields"
    if kind == "unknown_message":
        return [[_SEQ, msgpack.packb([PROTOCOL_VERSION, "os.system", {"command": "true"}])]], "unknown_type"
    if kind == "old_protocol":
        return [[_SEQ, msgpack.packb([PROTOCOL_VERSION - 1, "Hello", {"role": "rollout", "worker_id": 0,
                                                                     "pid": 1}])]], "protocol_version"
    if kind == "bad_envelope":
        return [[_chunk()]], "bad_envelope"
    if kind == "before_hello":
        return [[_SEQ, _chunk()]], "unknown_peer"
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


KINDS = ("truncated", "garbage", "oversized", "beyond_max_msg_size", "deeply_nested", "wrong_type",
         "unknown_message", "old_protocol", "bad_envelope", "before_hello")


def attack(endpoint: str, kind: str, *, count: int = 1, max_frame_bytes: int, seed: int = 0,
           timeout_s: float = 10.0) -> str | None:
    """Send ``count`` messages of ``kind`` to the hub at ``endpoint`` from one new connection; returns the reason
    the hub should count for each one."""
    rng = np.random.default_rng(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, int(timeout_s * 1000))  # close() waits until everything is on the wire
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        reason = None
        for _ in range(count):
            messages, reason = frames(kind, max_frame_bytes=max_frame_bytes, rng=rng)
            for parts in messages:
                sock.send_multipart(parts)
        return reason
    finally:
        sock.close()
        ctx.term()


def replay_hello(endpoint: str, *, role: str, worker_id: int, pid: int, timeout_s: float = 10.0) -> None:
    """Replay the first frame (Hello, sequence number 1) of the peer ``{role}-{worker_id}-{pid}``, under its
    routing id: what a stale copy of a dead worker, or a captured frame, looks like. The hub must count it as
    ``replayed`` once that peer is gone (it remembers the last sequence number of retired peers)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, int(timeout_s * 1000))
    sock.setsockopt(zmq.ROUTING_ID, f"{role}-{worker_id}-{pid}".encode())
    try:
        sock.connect(endpoint)
        sock.send_multipart([_SEQ, encode(Hello(role=role, worker_id=worker_id, pid=pid))])
    finally:
        sock.close()
        ctx.term()


def tcp_garbage(endpoint: str, *, size: int = 4096, seed: int = 0, zmtp_signature: bool = True) -> None:
    """Connect with plain TCP and send bytes that are not a valid ZMTP handshake (a port scanner, a stray client).
    With ``zmtp_signature`` the bytes start like a ZMTP 3 greeting, so the handshake fails (``bad_handshake``);
    without, ZeroMQ may read them as unversioned ZMTP 1.0 frames, which then fail the envelope check."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    junk = np.random.default_rng(seed).bytes(size)
    head = b"\xff" + bytes(8) + b"\x7f" + b"\x09\x09" if zmtp_signature else b"GET / HTTP/1.1\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head + junk)
        time.sleep(0.2)


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of process ``pid`` (default: this one) in MiB, from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- fuzzing ------------------------------------------------------------------------------------------------


def valid_frames() -> list[bytes]:
    """A few real frames to mutate."""
    from transport.messages import Scored, TrainBatch

    n = 6
    return [_chunk(), encode(Scored(sample_key="g1/0", reward=0.5, valid=True, reward_parts={"correct": 1.0})),
            encode(TrainBatch(step=1, input_ids=np.ones((2, n), np.int32), prompt_lens=np.ones(2, np.int32),
                              response_lens=np.ones(2, np.int32), behavior_logprobs=np.zeros((2, n), np.float32),
                              token_versions=np.zeros((2, n), np.int32), advantages=np.zeros(2, np.float32)))]


def _random_value(rng: np.random.Generator, depth: int = 0):
    kind = int(rng.integers(0, 9 if depth < 3 else 7))
    if kind == 7:
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    if kind == 8:
        return {str(rng.integers(9)): _random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}
    return [None, bool(rng.integers(2)), int(rng.integers(-2**31, 2**31)), float(rng.standard_normal()),
            "x" * int(rng.integers(0, 9)), rng.bytes(int(rng.integers(0, 9))), 2**64 - 1][kind]


def fuzz_frame(rng: np.random.Generator, valid: list[bytes]) -> bytes:
    """One fuzzed frame: random bytes, a mutated valid frame, or well-formed msgpack with a random (often real)
    message name, random fields and values, and a random protocol version."""
    from transport.messages import MESSAGE_TYPES

    mode = int(rng.integers(3))
    if mode == 0:
        return rng.bytes(int(rng.integers(0, 512)))
    if mode == 1:
        frame = bytearray(valid[int(rng.integers(len(valid)))])
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(len(frame))) if frame else 0
            op = int(rng.integers(4))
            if op == 0 and frame:
                frame[i] ^= int(rng.integers(1, 256))
            elif op == 1:
                del frame[i:]
            elif op == 2:
                frame[i:i] = rng.bytes(int(rng.integers(1, 16)))
            elif frame:
                del frame[i]
        return bytes(frame)
    names = [c.__name__ for c in MESSAGE_TYPES] + ["Nope"]
    version = [PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION - 1, "3"][int(rng.integers(4))]
    fields = ["sample_key", "reward", "valid", "group_id", "token_ids", "role", "pid", "worker_id", "step", "junk"]
    body = {fields[int(rng.integers(len(fields)))]: _random_value(rng) for _ in range(int(rng.integers(0, 6)))}
    return msgpack.packb([version, names[int(rng.integers(len(names)))], body])


def flood_producer(endpoint: str, total: int, hwm: int, sent: list[int], blocked, resume,
                   tokens: int = 16 * 1024) -> None:
    """A well-behaved but fast peer: Hello, then ``total`` ResponseChunks of ``tokens`` int32 tokens (prompt_id =
    position). Sends without blocking until ZeroMQ refuses (its high-water mark ``hwm`` reached: the consumer is
    pushing back), sets ``blocked``, waits for ``resume``, then sends the rest blocking. Appends each sent
    position to ``sent``. ``blocked``/``resume`` are threading.Events."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.setsockopt(zmq.ROUTING_ID, f"rollout-0-{os.getpid()}".encode())
    token_ids = np.zeros(tokens, np.int32)
    try:
        sock.connect(endpoint)
        sock.send_multipart([_SEQ, encode(Hello(role="rollout", worker_id=0, pid=os.getpid()))])
        i = 0
        while i < total:
            frame = encode(ResponseChunk(group_id="g", sample_index=0, prompt_id=i, offset=i * tokens,
                                         token_ids=token_ids, behavior_logprobs=np.zeros(0, np.float32),
                                         token_versions=np.zeros(0, np.int32)))
            try:
                sock.send_multipart([(i + 2).to_bytes(8, "big"), frame], flags=0 if resume.is_set() else zmq.NOBLOCK)
                sent.append(i)
                i += 1
            except zmq.Again:
                blocked.set()
                resume.wait(60)
    finally:
        sock.close()
        ctx.term()
