"""transport.codec: messages round-trip, arrays decode as read-only views, every bad frame is a FrameError."""

import random
import struct

import msgpack
import numpy as np
import pytest

from transport.codec import DEFAULT_MAX_FRAME_BYTES, FrameError, decode, encode
from transport.messages import (MESSAGE_TYPES, PROTOCOL_VERSION, CancelRequest, CheckpointSaved, ContinueRequest,
                                SaveCheckpoint, ResponseChunk, ErrorReport, GenerateRequest, Heartbeat,
                                Hello, Judged, JudgeRequest, LoadWeights, Scored, ScoreRequest, Shutdown, TrainBatch, TrainResult,
                                WeightsLoaded)
from transport.messages import FetchWeights, WeightsChunk, WeightsOffer
from transport.messages import DropWeightGroup, WeightsSending, WeightsWanted

pytestmark = pytest.mark.timeout(10)

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
          np.float16, np.float32, np.float64]
SHAPES = [(0,), (5,), (2, 3), (0, 4), (2, 1, 3), ()]


def _array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(rng.standard_normal(shape) * 100).astype(dtype)


def _samples():
    i32, f32 = np.int32, np.float32
    return [
        Hello(role="rollout", worker_id=3, pid=4242),
        Heartbeat(sent_at=1732550000.25),
        Shutdown(reason="done"),
        Shutdown(),
        ErrorReport(where="rollout-0", error="Traceback ...\nValueError: x"),
        GenerateRequest(group_id="g1", prompt_id=7, prompt_ids=np.arange(9, dtype=i32), num_samples=8,
                        max_new_tokens=64, temperature=0.0),
        ResponseChunk(group_id="g1", sample_index=2, prompt_id=7, offset=0, token_ids=np.arange(5, dtype=i32),
                   behavior_logprobs=-np.linspace(0, 1, 5, dtype=f32), token_versions=np.full(5, 3, i32),
                   finish_reason="stop", worker_id=1),
        ContinueRequest(group_id="g1", sample_index=3, prompt_id=7, prompt_ids=np.arange(9, dtype=i32),
                        prefix=np.arange(4, dtype=i32), max_new_tokens=64, temperature=1.0, return_routes=True),
        CancelRequest(sample_keys=["g1/3", "g2/0"]),
        SaveCheckpoint(step=50, path="/tmp/run/checkpoints/step_000050/learner"),
        CheckpointSaved(step=50, path="/tmp/run/checkpoints/step_000050/learner", seconds=1.5),
        LoadWeights(version=12, path="/tmp/run/weights/v12.safetensors"),
        LoadWeights(version=13, path="/tmp/run/weights/v13.safetensors", digest="sha256:" + "ab" * 32),
        WeightsLoaded(version=12, worker_id=1, load_s=0.5),
        WeightsOffer(version=13, digest="sha256:" + "ab" * 32, num_bytes=10, chunk_bytes=4),
        FetchWeights(version=13, index=2, attempt=1),
        WeightsChunk(version=13, index=2, offset=8, data=np.arange(2, dtype=np.uint8), crc32=7, attempt=1),
        WeightsWanted(group_name="everyprompt-w1-ab", world_size=2, version=13, worker_id=1),
        WeightsSending(group_name="everyprompt-w1-ab", version=13, names=["a.weight", "b.bias"],
                       dtypes=["bfloat16", "float32"], shapes=[[2, 3], [3]], ends=[1, 2], master_address="127.0.0.1",
                       master_port=29600),
        DropWeightGroup(group_name="everyprompt-w1-ab"),
        ScoreRequest(sample_key="g1/2", token_ids=np.zeros(0, i32), answer="42"),
        Scored(sample_key="g1/2", reward=1.0, valid=True, reward_parts={"format": 0.5, "exact": 1.0},
               text="42"),
        JudgeRequest(group_id="g1", prompt_ids=np.arange(9, dtype=i32), token_ids=np.arange(7, dtype=i32),
                     offsets=np.array([0, 3, 7], dtype=i32), sample_indices=[0, 1], answer="42"),
        Judged(group_id="g1", sample_indices=[0, 1], rewards=[1.0, -1.0], valid=[True, True],
               parts={"judge_calls": 1.0}),
        TrainBatch(step=3, input_ids=np.arange(24, dtype=i32).reshape(4, 6), prompt_lens=np.full(4, 2, i32),
                   response_lens=np.full(4, 4, i32), behavior_logprobs=_array(f32, (4, 6)),
                   token_versions=np.full((4, 6), -1, i32), advantages=_array(f32, (4,))),
        TrainResult(step=3, version=4, weights_path="/tmp/v4.safetensors",
                    stats={"loss": 0.25, "grad_norm": 1}, weights_digest="sha256:" + "cd" * 32),
    ]


def _assert_same(a, b):
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape, name
            assert x.tobytes() == y.tobytes(), name  # bit-exact, NaNs included
        else:
            assert x == y and type(x) is type(y), name


def test_samples_cover_every_message_type():
    assert {type(m) for m in _samples()} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    _assert_same(msg, decode(encode(msg)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_arrays_round_trip_exactly(dtype, shape):
    arr = _array(dtype, shape, seed=len(shape))
    msg = GenerateRequest(group_id="g", prompt_id=0, prompt_ids=arr, num_samples=1, max_new_tokens=1,
                          temperature=1.0)
    out = decode(encode(msg)).prompt_ids
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_non_contiguous_and_big_endian_arrays_are_sent_as_c_order_little_endian():
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    msg = TrainBatch(step=0, input_ids=base[:, ::2], prompt_lens=base[0].astype(">i4"), response_lens=base.T,
                     behavior_logprobs=np.zeros((1, 1), np.float32), token_versions=base, advantages=base[1])
    out = decode(encode(msg))
    np.testing.assert_array_equal(out.input_ids, base[:, ::2])
    np.testing.assert_array_equal(out.prompt_lens, base[0])
    assert out.prompt_lens.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out.response_lens, base.T)


def test_arrays_are_read_only_zero_copy_views_of_the_frame():
    msg = ResponseChunk(group_id="g", sample_index=0, prompt_id=0, offset=0, token_ids=np.arange(6, dtype=np.int32),
                     behavior_logprobs=np.zeros(6, np.float32), token_versions=np.zeros(6, np.int32),
                     finish_reason="length")
    frame = bytearray(encode(msg))
    out = decode(frame)
    arr = out.token_ids
    assert arr.flags.writeable is False
    with pytest.raises(ValueError):
        arr[0] = 9
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and base.obj is frame
    # Prove there is no copy: change the frame's bytes under the array.
    def address(a):
        return a.__array_interface__["data"][0]

    data_at = address(arr) - address(np.frombuffer(frame, np.uint8))
    assert data_at % 8 == 0  # raw data lands 8-byte aligned within the frame
    frame[data_at:data_at + 4] = struct.pack("<i", 1234)
    assert arr[0] == 1234


def test_decode_accepts_memoryview_and_reports_no_writeable_arrays_from_bytes():
    msg = ScoreRequest(sample_key="k", token_ids=np.arange(3, dtype=np.int32), answer="a")
    frame = encode(msg)
    out = decode(memoryview(frame))
    assert out.token_ids.flags.writeable is False and out.token_ids.flags.aligned
    assert out.token_ids.tolist() == [0, 1, 2]


def test_frame_is_standard_msgpack():
    frame = encode(Hello(role="reward", worker_id=0, pid=1))
    assert msgpack.unpackb(frame) == [PROTOCOL_VERSION, "Hello", {"role": "reward", "worker_id": 0, "pid": 1}]


def test_numpy_scalars_are_sent_as_python_numbers():
    out = decode(encode(Scored(sample_key="k", reward=np.float32(0.5), valid=np.bool_(True),
                               reward_parts={"a": np.float64(2.0), "b": np.int64(3)})))
    assert (out.reward, out.valid, out.reward_parts) == (0.5, True, {"a": 2.0, "b": 3.0})
    assert type(out.reward) is float and type(out.valid) is bool and type(out.reward_parts["b"]) is float


def test_encode_refuses_unsupported_values():
    with pytest.raises(TypeError, match="complex128"):
        encode(ScoreRequest(sample_key="k", token_ids=np.zeros(2, np.complex128), answer=""))
    with pytest.raises(TypeError, match="top-level np.ndarray"):
        encode(Scored(sample_key="k", reward=0.0, valid=True, reward_parts={"a": np.zeros(2)}))
    with pytest.raises(TypeError, match="MESSAGE_TYPES"):
        encode(object())


# ---- rejections ----------------------------------------------------------------------------------------


def _frame(version=PROTOCOL_VERSION, name="Hello", body=None):
    body = {"role": "rollout", "worker_id": 0, "pid": 1} if body is None else body
    return msgpack.packb([version, name, body])


def _array_ext(dtype=b"<i4", shape=(3,), data=bytes(12), data_offset=None):
    head = 6 + 8 * len(shape)
    data_offset = head if data_offset is None else data_offset
    payload = struct.pack("<H3sB", data_offset, dtype, len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    return msgpack.ExtType(1, payload + bytes(data_offset - head) + data)


def _score_request(token_ids):
    return _frame(name="ScoreRequest", body={"sample_key": "k", "token_ids": token_ids, "answer": ""})


def _nested(depth: int) -> bytes:
    """Scored whose reward_parts is ``depth`` nested one-element lists."""
    pack = msgpack.packb
    fields = pack("sample_key") + pack("k") + pack("reward") + pack(0.0) + pack("valid") + pack(True)
    return (b"\x93" + pack(PROTOCOL_VERSION) + pack("Scored") + b"\x84" + fields + pack("reward_parts")
            + b"\x91" * depth + b"\xc0")


GOOD = encode(Hello(role="rollout", worker_id=0, pid=1))
BAD_FRAMES = {
    "empty": (b"", "malformed"),
    "garbage": (b"\xc1\xc1\xc1\xc1", "malformed"),
    "text": (b"hello world", "malformed"),
    "truncated": (GOOD[:-3], "malformed"),
    "truncated_array": (encode(ScoreRequest(sample_key="k", token_ids=np.arange(9), answer=""))[:-30],
                        "malformed"),
    "trailing": (GOOD + b"\x00", "malformed"),
    "top_level_map": (msgpack.packb({"type": "Hello"}), "malformed"),
    "two_elements": (msgpack.packb([PROTOCOL_VERSION, "Hello"]), "malformed"),
    "bad_utf8": (b"\x93" + bytes([PROTOCOL_VERSION]) + b"\xa2\xff\xfe\x80", "malformed"),
    "old_protocol": (_frame(version=0), "protocol_version"),
    "version_not_int": (_frame(version="1"), "protocol_version"),
    "version_bool": (_frame(version=True), "protocol_version"),
    "unknown_type": (_frame(name="Nope"), "unknown_type"),
    "type_not_str": (_frame(name=5), "unknown_type"),
    "body_list": (_frame(body=[1, 2]), "bad_fields"),
    "unknown_field": (_frame(body={"role": "r", "worker_id": 0, "pid": 1, "extra": 1}), "bad_fields"),
    "missing_field": (_frame(body={"role": "r", "worker_id": 0}), "bad_fields"),
    "repeated_field": (b"\x93" + bytes([PROTOCOL_VERSION]) + b"\xa5Hello\x83\xa3pid\x01\xa3pid\x02\xa4role\xa1r",
                       "bad_fields"),
    "wrong_type_str": (_frame(body={"role": "r", "worker_id": "0", "pid": 1}), "bad_fields"),
    "bool_for_int": (_frame(body={"role": "r", "worker_id": True, "pid": 1}), "bad_fields"),
    "float_for_int": (_frame(body={"role": "r", "worker_id": 0.0, "pid": 1}), "bad_fields"),
    "list_for_array": (_score_request([1, 2, 3]), "bad_fields"),
    "array_for_str": (_frame(name="Shutdown", body={"reason": _array_ext()}), "bad_fields"),
    "digest_not_str": (_frame(name="LoadWeights", body={"version": 1, "path": "p", "digest": b"\x00" * 32}),
                       "bad_fields"),
    "bad_dict_value": (_frame(name="Scored", body={"sample_key": "k", "reward": 0.0, "valid": True,
                                                    "reward_parts": {"a": "x"}}), "bad_fields"),
    "timestamp_ext": (_frame(name="Heartbeat", body={"sent_at": msgpack.Timestamp(1)}), "bad_fields"),
    "array_dtype_object": (_score_request(_array_ext(dtype=b"|O8")), "bad_array"),
    "array_dtype_complex": (_score_request(_array_ext(dtype=b"<c8", data=bytes(24))), "bad_array"),
    "array_bytes_mismatch": (_score_request(_array_ext(shape=(4,))), "bad_array"),
    "array_negative_dim": (_score_request(_array_ext(shape=(-3,), data=b"")), "bad_array"),
    "array_too_many_dims": (_score_request(_array_ext(shape=(1,) * 40, data=bytes(4))), "bad_array"),
    "array_offset_past_end": (_score_request(
        msgpack.ExtType(1, struct.pack("<H3sBq", 200, b"<i4", 1, 0))), "bad_array"),
    "array_dims_overflow": (_score_request(_array_ext(shape=(2**62, 2**62, 0), data=b"")), "bad_array"),
    "array_payload_short": (_score_request(msgpack.ExtType(1, b"\x01\x02")), "bad_array"),
    "unknown_ext": (_score_request(msgpack.ExtType(7, b"xyz")), "bad_array"),
    "array_nested_in_list": (_frame(name="TrainResult", body={"step": 0, "version": 0, "weights_path": "",
                                                               "stats": {"a": _array_ext()}}), "bad_array"),
    "nested_shallow": (_nested(100), "bad_fields"),
    "nested_10000": (_nested(10_000), "too_deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_bad_frames_raise_frame_error_with_reason(case):
    frame, reason = BAD_FRAMES[case]
    with pytest.raises(FrameError) as info:
        decode(frame)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ValueError) and str(info.value)


def test_too_large_is_checked_before_parsing():
    with pytest.raises(FrameError) as info:
        decode(b"\xc1" * 101, max_frame_bytes=100)  # garbage, but the size check comes first
    assert info.value.reason == "too_large"
    assert decode(GOOD, max_frame_bytes=len(GOOD)) == Hello(role="rollout", worker_id=0, pid=1)
    assert DEFAULT_MAX_FRAME_BYTES >= 64 * 1024 * 1024


def test_protocol_error_names_both_versions():
    with pytest.raises(FrameError, match=rf"protocol 0.*speaks {PROTOCOL_VERSION}.*same everyprompt version"):
        decode(_frame(version=0))


def test_mutated_frames_only_ever_raise_frame_error():
    rng = random.Random(0)
    frames = [encode(m) for m in _samples()]
    for _ in range(3000):
        frame = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(frame) + 1)
            match rng.randrange(3):
                case 0 if where < len(frame):
                    frame[where] = rng.randrange(256)
                case 1:
                    del frame[where:]
                case _:
                    frame.insert(where, rng.randrange(256))
        try:
            decode(bytes(frame))
        except FrameError:
            pass
