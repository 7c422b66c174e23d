"""Codec throughput on frames shaped like real traffic: a ResponseChunk and a TrainBatch."""

from __future__ import annotations

import argparse
import time

import numpy as np

from transport import ResponseChunk, TrainBatch, decode, encode


def _frames(response_len: int, batch: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    completion = ResponseChunk(group_id="g1", sample_index=0, prompt_id=1, offset=0,
                            token_ids=rng.integers(0, 100, response_len, dtype=np.int32),
                            behavior_logprobs=rng.standard_normal(response_len).astype(np.float32),
                            token_versions=np.zeros(response_len, np.int32), finish_reason="stop")
    length = 32 + response_len
    train = TrainBatch(step=1, input_ids=rng.integers(0, 100, (batch, length), dtype=np.int32),
                       prompt_lens=np.full(batch, 32, np.int32), response_lens=np.full(batch, response_len, np.int32),
                       behavior_logprobs=rng.standard_normal((batch, length)).astype(np.float32),
                       token_versions=np.zeros((batch, length), np.int32),
                       advantages=rng.standard_normal(batch).astype(np.float32))
    return {"completion": completion, "train_batch": train}


def _time(fn, min_s: float = 0.5) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench codec", description=__doc__)
    p.add_argument("--response-len", type=int, default=4096, help="response tokens per frame")
    p.add_argument("--batch", type=int, default=512, help="sequences in the TrainBatch frame")
    a = p.parse_args(argv)
    rows, out = [], {}
    for name, msg in _frames(a.response_len, a.batch).items():
        frame = encode(msg)
        enc_s, dec_s = _time(lambda: encode(msg)), _time(lambda: decode(frame))
        out[name] = {"bytes": len(frame), "encode_us": enc_s * 1e6, "decode_us": dec_s * 1e6,
                     "encode_gb_s": len(frame) / enc_s / 1e9, "decode_gb_s": len(frame) / dec_s / 1e9}
        rows.append([name, len(frame), enc_s * 1e6, dec_s * 1e6, len(frame) / enc_s / 1e9, len(frame) / dec_s / 1e9])
    print_table(["frame", "bytes", "encode_us", "decode_us", "encode_GB/s", "decode_GB/s"], rows)
    return {"config": vars(a), "metrics": out}
