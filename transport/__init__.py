"""Typed messages over ZeroMQ: the only package that imports zmq or msgpack.

``messages`` defines the wire dataclasses, ``codec`` turns them into frames and back (never unpickling),
``channels`` moves frames between the coordinator's ``Hub`` and each actor's ``Peer``.
"""

from transport.channels import Hub, Peer, PeerInfo, PeerLost, run
from transport.codec import DEFAULT_MAX_FRAME_BYTES, FrameError, decode, encode
from transport.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    CancelRequest,
    CheckpointSaved,
    ContinueRequest,
    ErrorReport,
    GenerateRequest,
    Heartbeat,
    Hello,
    Judged,
    JudgeRequest,
    LoadWeights,
    ResponseChunk,
    SaveCheckpoint,
    ScoreRequest,
    Scored,
    Shutdown,
    TrainBatch,
    TrainResult,
    WeightsLoaded,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "CancelRequest",
    "CheckpointSaved",
    "ContinueRequest",
    "ErrorReport",
    "FrameError",
    "GenerateRequest",
    "Heartbeat",
    "Hello",
    "Hub",
    "Judged",
    "JudgeRequest",
    "Peer",
    "PeerInfo",
    "PeerLost",
    "LoadWeights",
    "ResponseChunk",
    "SaveCheckpoint",
    "ScoreRequest",
    "Scored",
    "Shutdown",
    "TrainBatch",
    "TrainResult",
    "WeightsLoaded",
    "decode",
    "encode",
    "run",
]
