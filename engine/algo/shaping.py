"""Reward shaping (ALGORITHMS.md B.2.2): graded correctness plus length and repetition penalties, as parts.

Pure functions of the ``reward`` config section (``RewardConfig``: ``graded``, ``overlong_*``, ``repetition_*``).
``reward_parts`` returns every part separately; ``shaped_reward`` combines them. The raw correctness part
``"correct"`` (0/1) is what every zero-variance decision uses (filters, top-ups, RL-ZVP signs, metrics); the shaped
reward only feeds the advantages. Filtering on a shaped reward is a known peer bug: a group
of equally correct answers of different lengths looks informative when it carries no correctness signal.
"""

from __future__ import annotations

from collections.abc import Sequence

from configs.schema import RewardConfig

Shaping = RewardConfig  # the settings shaping reads: reward.graded, reward.overlong_*, reward.repetition_*


def partial_credit(response: str, reference: str) -> float:
    """Fraction of the reference's characters reproduced at their position, over the longer of the two
    (``"225"`` for ``"215"`` -> 2/3; extra characters count against). 1.0 exactly when the strings match."""
    if not reference:
        return 0.0
    hits = sum(a == b for a, b in zip(response, reference))
    return hits / max(len(response), len(reference))


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's soft overlong penalty: 0 up to ``max_length - cache`` tokens, then linear down to -1 at
    ``max_length`` (a response cut at the limit gets -1)."""
    start = max_length - cache
    if length <= start:
        return 0.0
    if length >= max_length or cache <= 0:
        return -1.0
    return (start - length) / cache


def repetition_penalty(tokens: Sequence[int], n: int) -> float:
    """-(fraction of repeated n-grams): 0 when every n-gram is new, towards -1 for a loop."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


def reward_parts(*, correct: float, response: str, reference: str, tokens: Sequence[int], max_length: int,
                 shaping: RewardConfig) -> dict[str, float]:
    """Every part of the reward of one response (``correct`` is the raw verifier outcome)."""
    return {"correct": float(correct), "partial": partial_credit(response, reference) if shaping.graded else correct,
            "overlong": overlong_penalty(len(tokens), max_length, shaping.overlong_cache),
            "repetition": repetition_penalty(tokens, shaping.repetition_ngram)}


def shaped_reward(parts: dict[str, float], shaping: RewardConfig) -> float:
    base = parts["partial"] if shaping.graded else parts["correct"]
    return base + shaping.overlong_coef * parts["overlong"] + shaping.repetition_coef * parts["repetition"]


def is_zero_variance(correct: Sequence[float]) -> bool:
    """The zero-variance test every filter and decision uses: raw correctness all equal (never the shaped
    reward)."""
    return len(set(correct)) <= 1
