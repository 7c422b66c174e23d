"""Calibrate the simulated backend's cost model (``sim.*``) from a real backend: the transformers one here.

Times ``engine/modeling/decode.py`` on the run's model (one torch thread, routes recorded, as a rollout worker runs it):
decode steps at several running-batch sizes, fitted by least squares to ``decode_base_s + b * decode_per_seq_s``,
and the prefill of a batch of prompts, per prompt token (``prefill_per_token_s``). With another backend (sglang on
a GPU), time the same two things and pass the fitted values as ``sim.*`` overrides.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from configs.schema import ModelConfig
from engine.modeling.decode import DecodeBatch
from engine.modeling.rows import Row
from engine.modeling.model import build_model
from engine.data.tasks import CharTokenizer


def _rows(n: int, prompt_len: int, max_new: int) -> list[Row]:
    return [Row(key=i, prompt=[(i * 7 + j) % 90 + 3 for j in range(prompt_len)], max_new_tokens=max_new,
                temperature=1.0) for i in range(n)]


def calibrate(*, batches=(1, 4, 16, 64), prompt_len: int = 32, steps: int = 24, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # as each rollout worker process runs
    tok = CharTokenizer()
    model = build_model(ModelConfig(), tok.vocab_size, seed=seed).eval()
    step_s, prefill_per_token = [], []
    for b in batches:
        batch = DecodeBatch(model, eos_id=-1, pad_id=tok.pad_id, capture_routes=True,  # eos -1: no early stops
                            generator=torch.Generator().manual_seed(seed))
        batch.add(_rows(b, prompt_len, steps + 8))
        t0 = time.perf_counter()
        batch.step(0)  # the prefill (and the first token)
        prefill_per_token.append((time.perf_counter() - t0) / (b * prompt_len))
        for _ in range(2):  # warm-up
            batch.step(0)
        t0 = time.perf_counter()
        for _ in range(steps):
            batch.step(0)
        step_s.append((time.perf_counter() - t0) / steps)
    per_seq, base = np.polyfit(np.asarray(batches, dtype=float), np.asarray(step_s), 1)
    return {"decode_base_s": float(max(base, 0.0)), "decode_per_seq_s": float(max(per_seq, 0.0)),
            "prefill_per_token_s": float(np.median(prefill_per_token)),
            "measured": [{"batch": b, "step_s": s} for b, s in zip(batches, step_s)]}
