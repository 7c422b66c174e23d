"""The tie-aware generative judge (ALGORITHMS.md B.5): prompt template, verdict parser, pair selection under a
call budget, and the two reward constructions.

A scalar reward model's noise near the group mean flips advantage signs once the group is normalised. A judge
that can say "Tie" gives equal-quality responses identical rewards, so their advantages are exactly equal (and
0 for a response tied on balance): only real preferences produce signed advantages.

Flow in a run: every response is first verified on its own (``reward.judge.verifier``, for the raw correctness
that accuracy and zero-variance decisions use). When a group is complete the coordinator (engine/coordinator/rollouts.py)
sends one ``JudgeRequest`` with the prompt and all its responses to a reward worker, which calls ``judge_group``
with its judge backend (actors/judge_backend.py: the transformers decode loop of the rollout workers, or an
sglang server) and answers ``Judged``. The group's rewards become the judge margins; the learner then uses
``engine.algo.advantages.tie_aware_advantages``.

Constructions (``reward.judge.construction``):
- ``round_robin``: pairs (i, j) of the group, r_i = mean over i's judged pairs of v(i, j), v in {+1, 0, -1};
  G(G-1)/2 calls, or a seeded random subset when that exceeds ``reward.judge.max_calls_per_group``.
- ``anchor``: each response against the reference answer (``anchor=reference``) or the group's first response
  (``anchor=first``, which gets 0): r_i = v(i, anchor); G calls (or the first ones within the budget).
``both_orders`` judges each pair as (A, B) and (B, A) and averages (position bias cancels; twice the calls);
with ``order_rule="agree"`` a pair is Better/Worse only when both orders say so, else Tie.
Round-robin robustness to judge errors (``engine.algo.advantages.pairwise_rewards``): ``tie_margin`` is a dead zone in
net verdicts (a response within it is tied: reward 0), ``group_tie_frac`` a group-level tie test (a group with at
most this fraction of non-Tie verdicts is all-tie). The anchor construction uses neither: its margin is one verdict.
A verdict that does not parse is a recorded failure: the pair counts as not judged, and a response without a
judged pair is invalid (outside Eq. 11's set).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

import torch

from configs.schema import JudgeConfig
from engine.algo.advantages import pairwise_rewards

DEFAULT_TEMPLATE = ("Question: {question}\nResponse A: {response_a}\nResponse B: {response_b}\n"
                    "Is A Better, Tie or Worse than B?\nVerdict:")
VERDICTS = {"better": 1, "tie": 0, "worse": -1}
JUDGE_PART = "judge_margin"  # the reward part that marks a judge-rewarded response (tie-aware advantages)


def merge_orders(verdicts: list[int], rule: str = "mean") -> float:
    """One pair's parsed verdicts (of the same response against the same other, 1 or 2 orders) -> v in [-1, 1].
    ``mean``: their average. ``agree``: Better/Worse only when both orders were parsed and agree, else Tie (0)."""
    if rule == "agree":
        return float(verdicts[0]) if len(verdicts) == 2 and verdicts[0] == verdicts[1] else 0.0
    return sum(verdicts) / len(verdicts)


class JudgeBackend(Protocol):
    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]: ...


@dataclass
class JudgeOutcome:
    rewards: list[float]  # per response, the margin (0 where invalid)
    valid: list[bool]
    parts: dict[str, float]  # group-level counts: judge_calls, judge_parse_failures, judge_ties, judge_pairs


def parse_verdict(text: str) -> int | None:
    """+1 Better / 0 Tie / -1 Worse, or None for malformed output. Reasoning before ``</think>`` is ignored.
    Accepted: an explicit ``Verdict: X`` (the last one wins), or output whose first word is a verdict and that
    names no other verdict."""
    text = text.rsplit("</think>", 1)[-1]
    explicit = re.findall(r"verdict\s*[:=]?\s*\**\s*(better|tie|worse)\b", text, flags=re.IGNORECASE)
    if explicit:
        return VERDICTS[explicit[-1].lower()]
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    if words and words[0] in VERDICTS and {w for w in words if w in VERDICTS} == {words[0]}:
        return VERDICTS[words[0]]
    return None


def render(template: str, *, question: str, response_a: str, response_b: str, reference: str,
           max_chars: int) -> str:
    return template.format(question=question, response_a=response_a[:max_chars],
                           response_b=response_b[:max_chars], reference=reference)


def select_pairs(num: int, spec: JudgeConfig, rng: random.Random) -> list[tuple[int, int]]:
    """Ordered (a, b) comparisons to make, within the budget. Index ``-1`` is the reference answer."""
    cost = 2 if spec.both_orders else 1
    if spec.construction == "anchor":
        anchor = -1 if spec.anchor == "reference" else 0
        pairs = [(i, anchor) for i in range(num) if i != anchor]
    else:
        pairs = [(i, j) for i in range(num) for j in range(i + 1, num)]
        rng.shuffle(pairs)
        pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pairs]  # no fixed position for anyone
    if spec.max_calls_per_group:
        pairs = pairs[:spec.max_calls_per_group // cost]
    return [q for a, b in pairs for q in ([(a, b), (b, a)] if spec.both_orders else [(a, b)])]


def judge_group(backend: JudgeBackend, spec: JudgeConfig, *, question: str, responses: list[str], reference: str,
                seed: int = 0) -> JudgeOutcome:
    """Judge one group as ``spec`` (``reward.judge``) says: prompts for the selected pairs, one batched
    generation, parse, construct rewards."""
    num = len(responses)
    calls = select_pairs(num, spec, random.Random(seed))
    text = {i: r for i, r in enumerate(responses)} | {-1: reference}
    prompts = [render(spec.template or DEFAULT_TEMPLATE, question=question, response_a=text[a], response_b=text[b],
                      reference=reference, max_chars=spec.max_response_chars) for a, b in calls]
    outputs = backend.generate(prompts, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature) if calls \
        else []
    verdicts = [parse_verdict(o) for o in outputs]
    anchor = (-1 if spec.anchor == "reference" else 0) if spec.construction == "anchor" else None
    sums: dict[tuple[int, int], list[int]] = {}  # canonical pair (i, j) -> verdicts of i against j
    for (a, b), v in zip(calls, verdicts):
        if v is None:
            continue
        if anchor is not None:
            key, sign = ((a, b), 1) if b == anchor else ((b, a), -1)
        else:
            key, sign = ((a, b), 1) if a < b else ((b, a), -1)
        sums.setdefault(key, []).append(sign * v)
    parts = {"judge_calls": float(len(calls)), "judge_parse_failures": float(sum(v is None for v in verdicts)),
             "judge_ties": float(sum(v == 0 for v in verdicts)), "judge_pairs": float(len(sums))}
    if anchor is not None:
        rewards = [0.0] * num
        valid = [False] * num
        for (i, _), vs in sums.items():
            rewards[i], valid[i] = merge_orders(vs, spec.order_rule), True
        if spec.anchor == "first" and num:
            valid[0] = any(valid)  # the anchor itself: tied with itself, 0
        return JudgeOutcome(rewards, valid, parts)
    v_GG = torch.zeros(num, num)
    j_GG = torch.zeros(num, num, dtype=torch.bool)
    for (i, j), vs in sums.items():
        v = merge_orders(vs, spec.order_rule)
        v_GG[i, j], v_GG[j, i] = v, -v
        j_GG[i, j] = j_GG[j, i] = True
    rewards_1G, valid_1G = pairwise_rewards(v_GG[None], j_GG[None], tie_margin=spec.tie_margin,
                                            group_tie_frac=spec.group_tie_frac)
    return JudgeOutcome(rewards_1G[0].tolist(), valid_1G[0].tolist(), parts)
