"""Calibrate the simulated backend's cost model (``sim.*``) from a real backend: the transformers one here.

Times ``engine/modeling/decode.py`` on the run's model as a rollout worker runs it (``threads`` torch threads, routes
recorded or not):
- decode steps at several running-batch sizes, at a context of ``prompt_len + context`` positions, fitted by least
  squares to ``decode_base_s + b * decode_per_seq_s``;
- what a group joining a running batch costs (``prefill_per_token_s``): a group of ``group_size`` rows sharing one
  prompt joins a running batch (one prefill of the shared prompt, its keys/values copied and appended, the rows
  dropped once finished), minus the plain decode steps it replaces, per prompt token. The simulator charges
  exactly that per joining group (``sim.prefill_on_add=new``). Without ``group_size`` (the old calibration), the
  prefill of a batch of prompts, per prompt token.
With another backend (sglang on a GPU), time the same things and pass the fitted values as ``sim.*`` overrides.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from configs.schema import ModelConfig
from engine.modeling.decode import DecodeBatch
from engine.modeling.rows import Row
from engine.modeling.model import build_model, load_model
from engine.data.tasks import CharTokenizer


def _rows(n: int, prompt_len: int, max_new: int, first: int = 0) -> list[Row]:
    return [Row(key=first + i, prompt=[((first + i) * 7 + j) % 90 + 3 for j in range(prompt_len)],
                max_new_tokens=max_new, temperature=1.0) for i in range(n)]


def _timed(fn, repeats: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def calibrate(*, batches=(1, 4, 16, 64), prompt_len: int = 32, steps: int = 24, seed: int = 0,
              model_dir: str | None = None, capture_routes: bool = True, context: int = 0, group_size: int = 0,
              joins: int = 8, threads: int = 1) -> dict:
    torch.set_num_threads(threads)  # as each rollout worker process runs
    tok = CharTokenizer()
    model = (load_model(model_dir) if model_dir else build_model(ModelConfig(), tok.vocab_size, seed=seed)).eval()

    def batch_of(b: int, max_new: int) -> DecodeBatch:
        batch = DecodeBatch(model, eos_id=-1, pad_id=tok.pad_id, capture_routes=capture_routes,  # no early stops
                            generator=torch.Generator().manual_seed(seed))
        batch.add(_rows(b, prompt_len, max_new))
        return batch

    step_s, prefill_per_token = [], []
    for b in batches:
        batch = batch_of(b, context + steps + 2 * joins + 8)
        t0 = time.perf_counter()
        batch.step(0)  # the prefill (and the first token)
        prefill_per_token.append((time.perf_counter() - t0) / (b * prompt_len))
        for _ in range(max(context, 2)):  # warm-up, up to the context length
            batch.step(0)
        step_s.append(_timed(lambda: batch.step(0), steps))
    per_seq, base = np.polyfit(np.asarray(batches, dtype=float), np.asarray(step_s), 1)
    fit = {"decode_base_s": float(max(base, 0.0)), "decode_per_seq_s": float(max(per_seq, 0.0)),
           "prefill_per_token_s": float(np.median(prefill_per_token)),
           "measured": [{"batch": b, "step_s": s} for b, s in zip(batches, step_s)]}
    if group_size:
        fit["prefill_per_token_s"] = _join_cost(batch_of, max(batches), prompt_len, context, group_size, joins,
                                                fit) / prompt_len
    return fit


def _join_cost(batch_of, b: int, prompt_len: int, context: int, group_size: int, joins: int, fit: dict) -> float:
    """Seconds a group of ``group_size`` rows sharing one prompt adds when it joins a running batch of
    ``b - group_size`` rows (its prefill, the cache merge, and dropping the rows once finished), median of ``joins``."""
    running = max(b - group_size, 1)
    batch = batch_of(running, context + 4 * joins + 8)
    for _ in range(max(context, 2)):
        batch.step(0)
    plain = fit["decode_base_s"] + running * fit["decode_per_seq_s"]
    extra = []
    for j in range(joins):
        prompt = [(j * 11 + i) % 90 + 3 for i in range(prompt_len)]
        group = [Row(key=("join", j, k), prompt=prompt, max_new_tokens=1, temperature=1.0) for k in range(group_size)]
        t0 = time.perf_counter()
        batch.add(group)
        batch.step(0)  # the prefill; each row samples its one token and finishes
        batch.remove(group)
        batch.step(0)  # the finished rows leave the cache
        extra.append(time.perf_counter() - t0 - 2 * plain)
    return float(max(np.median(extra), 0.0))
