"""Fuzz the codec with hypothesis: whatever bytes arrive, decode() returns a valid message or raises FrameError
(with a known reason), never anything else; nothing is ever unpickled or executed."""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport.codec import REASONS, FrameError, decode, encode
from transport.messages import MESSAGE_TYPES, PROTOCOL_VERSION, ResponseChunk, Scored, TrainBatch

pytestmark = pytest.mark.chaos
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = [cls.__name__ for cls in MESSAGE_TYPES]


def _valid_frames() -> list[bytes]:
    n = 6
    return [encode(Scored(sample_key="g1/0", reward=0.5, valid=True, reward_parts={"correct": 1.0}, text="42")),
            encode(ResponseChunk(group_id="g1", sample_index=2, prompt_id=7, offset=4,
                                 token_ids=np.arange(n, dtype=np.int32), behavior_logprobs=np.zeros(n, np.float32),
                                 token_versions=np.ones(n, np.int32), finish_reason="stop",
                                 routes=np.zeros((n - 1, 2, 2), np.uint8))),
            encode(TrainBatch(step=1, input_ids=np.ones((2, 3), np.int32), prompt_lens=np.ones(2, np.int32),
                              response_lens=np.ones(2, np.int32), behavior_logprobs=np.zeros((2, 3), np.float32),
                              token_versions=np.zeros((2, 3), np.int32), advantages=np.zeros(2, np.float32)))]


VALID = _valid_frames()


def _decode_or_reject(frame: bytes):
    try:
        msg = decode(frame, max_frame_bytes=1 << 20)
    except FrameError as e:
        assert e.reason in REASONS, e.reason
        return None
    assert type(msg) in MESSAGE_TYPES
    return msg


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_frame_error(data):
    _decode_or_reject(data)


@FUZZ
@given(st.sampled_from(range(len(VALID))), st.data())
def test_mutated_valid_frames_decode_or_are_rejected(which, data):
    frame = bytearray(VALID[which])
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del frame[i:]
        elif op == "insert":
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif frame:
            del frame[i]
    msg = _decode_or_reject(bytes(frame))
    if msg is not None:  # a mutation that still decodes is a well-typed message
        for name in msg.__slots__:
            value = getattr(msg, name)
            assert not isinstance(value, np.ndarray) or not value.flags.writeable


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=20),
                     st.binary(max_size=20))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=20)


@FUZZ
@given(st.sampled_from(NAMES + ["Nope", "__reduce__"]), st.dictionaries(st.text(max_size=16), _VALUES, max_size=8),
       st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, "3", None]))
def test_well_formed_msgpack_with_wrong_names_fields_types_or_versions_is_rejected_or_typed(name, body, version):
    msg = _decode_or_reject(msgpack.packb([version, name, body], use_bin_type=True))
    if msg is not None:
        assert version == PROTOCOL_VERSION and type(msg).__name__ == name


def test_deep_nesting_and_huge_declared_lengths_are_rejected_without_allocating():
    head = msgpack.packb(PROTOCOL_VERSION) + msgpack.packb("Scored") + b"\x81" + msgpack.packb("sample_key")
    with pytest.raises(FrameError) as e:
        decode(b"\x93" + head + b"\x91" * 50_000 + b"\xc0")
    assert e.value.reason == "too_deep"
    for declared in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff"):  # array/map/bin 4G
        with pytest.raises(FrameError) as e:
            decode(b"\x93" + head + declared)
        assert e.value.reason == "malformed"
