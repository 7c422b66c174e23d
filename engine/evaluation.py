"""Scoring an evaluation: pure functions shared by the run's periodic greedy eval (engine/coordinator/evals.py) and
``everyprompt-eval`` (engine/coordinator/eval_cli.py), so that both report the same numbers for the same responses.

- ``correctness``: a scored response's raw correctness, the verifier's verdict (the ``correct`` reward part that
  actors/reward_worker.py records), never the shaped reward; a response the verifier could not judge counts 0.
- ``pass_at_k``: the unbiased pass@k estimator of the Codex paper (Chen et al. 2021, arXiv 2107.03374): with ``n``
  samples of which ``c`` are correct, 1 - C(n - c, k) / C(n, k).
- ``score_eval``: greedy accuracy (the mean correctness of one greedy response per prompt) and, given ``k`` and
  several sampled responses per prompt, the mean pass@k over the prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SOLVED = 1.0 - 1e-9  # a sample passes (for pass@k) when its correctness is full: every test, every constraint


def correctness(reward: float, parts: Mapping[str, float]) -> float:
    """The raw correctness of one scored response: its ``correct`` part, else its reward (0 when invalid)."""
    return float(parts.get("correct", reward))


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of ``k`` samples drawn without replacement from ``n``, ``c`` of them correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}: "
                         f"draw at least k samples per prompt")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a product, stable for large n
        miss *= 1.0 - k / i
    return 1.0 - miss


def score_eval(greedy: Sequence[float], samples: Sequence[Sequence[float]] = (), *, k: int = 0) -> dict:
    """``greedy``: the correctness of each prompt's greedy response -> ``accuracy`` and ``num_prompts``.
    ``samples`` (one list of sampled responses' correctness per prompt) with ``k >= 1`` adds ``pass_at_k``, ``k``
    and ``num_samples`` (samples per prompt, the smallest count when they differ)."""
    if not greedy:
        raise ValueError("an evaluation needs at least one prompt: the split is empty")
    out: dict = {"accuracy": sum(greedy) / len(greedy), "num_prompts": len(greedy)}
    if k >= 1:
        if len(samples) != len(greedy):
            raise ValueError(f"pass@{k} needs sampled responses for each of the {len(greedy)} prompts, "
                             f"got {len(samples)}")
        per_prompt = [pass_at_k(len(s), sum(x >= SOLVED for x in s), k) for s in samples]
        out.update(pass_at_k=sum(per_prompt) / len(per_prompt), k=k, num_samples=min(len(s) for s in samples))
    return out
