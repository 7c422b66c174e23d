"""The simulated workload and cost model behind ``rollout.backend=sim`` (pure: numpy only, no torch).

Workload. Prompt ``p`` belongs to source ``p % sim.num_sources``; sources differ in typical length (factors
spread over 4x). Each prompt has a typical length drawn once from a log-normal around its source's (spread
``sim.prompt_sigma``): it is a property of the prompt, stable across epochs, which is what a per-prompt length
predictor can learn. Each sample of a group draws its own length around the prompt's (``sim.sample_sigma``),
seeded by its group and index, then clipped at ``max_new_tokens``. A response that reaches the limit finishes
with "length", any other with "stop" (its last token is EOS). Tokens are deterministic.

Cost model (simulated seconds): one decode step of a running batch of ``b`` sequences costs
``decode_base_s + b * decode_per_seq_s``; a group's prompt is prefilled once per worker (prefix reuse) at
``prefill_per_token_s`` per token, as is every unfinished response when its KV cache is recomputed after new
weights; applying weights costs ``load_s``. ``ideal_seconds`` is the generation-bound ideal: the decode work of
the given tokens at the full batch on every worker, with no idle time.
"""

from __future__ import annotations

import time
import zlib

import numpy as np

from configs.schema import SimConfig

_FIRST_TOKEN = 3  # ids below are pad, bos, eos (engine/data/tasks.py CharTokenizer)


def source_of(prompt_id: int, sim: SimConfig) -> str:
    return f"sim-{prompt_id % sim.num_sources}"


def _source_factor(prompt_id: int, sim: SimConfig) -> float:
    s, n = prompt_id % sim.num_sources, sim.num_sources
    return 1.0 if n == 1 else float(4.0 ** (s / (n - 1) - 0.5))  # 0.5x .. 2x of sim.mean_len


def typical_length(prompt_id: int, sim: SimConfig) -> float:
    """The prompt's typical response length (before clipping): fixed for the prompt, so stable across epochs."""
    z = np.random.default_rng([sim.seed, 1, prompt_id]).standard_normal()
    return sim.mean_len * _source_factor(prompt_id, sim) * float(np.exp(sim.prompt_sigma * z - sim.prompt_sigma ** 2 / 2))


def sample_length(prompt_id: int, group_id: str, sample_index: int, max_new_tokens: int, sim: SimConfig) -> int:
    z = np.random.default_rng([sim.seed, 2, prompt_id, zlib.crc32(group_id.encode()), sample_index]).standard_normal()
    length = typical_length(prompt_id, sim) * float(np.exp(sim.sample_sigma * z - sim.sample_sigma ** 2 / 2))
    return int(min(max(round(length), 1), max_new_tokens))


def response_tokens(prompt_id: int, sample_index: int, length: int, *, vocab_size: int, eos_id: int,
                    stop: bool) -> np.ndarray:
    """Deterministic response tokens; the last one is EOS when the response stops by itself."""
    ids = (prompt_id * 31 + sample_index * 7 + np.arange(length)) % (vocab_size - _FIRST_TOKEN) + _FIRST_TOKEN
    if stop:
        ids[-1] = eos_id
    return ids.astype(np.int32)


def prompt_tokens(prompt_id: int, sim: SimConfig, vocab_size: int) -> list[int]:
    return [int(t) for t in (prompt_id * 13 + np.arange(sim.prompt_len)) % (vocab_size - _FIRST_TOKEN) + _FIRST_TOKEN]


def step_seconds(batch: int, sim: SimConfig) -> float:
    """Simulated cost of one decode step of ``batch`` running sequences."""
    return sim.decode_base_s + batch * sim.decode_per_seq_s


def ideal_seconds(*, decode_tokens: int, prefill_tokens: int, num_workers: int, max_batch: int,
                  sim: SimConfig) -> float:
    """Generation-bound ideal: the work of these tokens spread evenly over ``num_workers`` workers that always
    decode a full batch of ``max_batch`` (total decode work / aggregate decode capacity)."""
    work = decode_tokens * step_seconds(max_batch, sim) / max_batch + prefill_tokens * sim.prefill_per_token_s
    return work / num_workers


def train_seconds(tokens: int, sim: SimConfig) -> float:
    """Simulated cost of one learner step (actors/sim_learner.py) over ``tokens`` prompt + response tokens."""
    return sim.train_base_s + tokens * sim.train_per_token_s


def detokenize_work(sim: SimConfig):
    """The post-processing pool's work on one simulated response: ``detok_per_token_s`` per token (blocking: it
    runs in a pool thread, so P threads detokenize P responses at once)."""
    def work(token_ids: np.ndarray) -> None:
        time.sleep(len(token_ids) * sim.detok_per_token_s * sim.time_scale)
    return work
