"""Advantage sign inversion: a noisy scalar reward with group normalisation vs the tie-aware judge (spec B.5).

A synthetic preference task with known ground truth: every response has a true quality in {0, 1, 2} (bad / ok /
good); a fraction of groups are all one quality (exact ties everywhere), the rest draw qualities at random, so
many responses tie with others. The true advantage sign of a response is the sign of (responses it beats - responses
that beat it). With three equally spaced levels this equals sign(quality - group mean), so the scalar baseline
and the judge are held to the same, unambiguous truth (checked on every group). A *true tie* is a response whose
true advantage is 0: the whole group ties, or it beats as many as beat it.

Per response: an *inversion* is an advantage of the opposite sign to the truth; on a true tie, any non-zero
advantage (the update pushes a response that deserves no push). Methods:

  scalar      r = quality + N(0, noise^2) (a Bradley-Terry-like reward model), Eq. 11 group normalisation
  tie-aware   the real judge path (engine/rewards/judge.py: template, prompt, parser, construction, budget) with a
              simulated judge backend: it reads the two qualities from the prompt and answers "Verdict: Better/Tie/
              Worse", right with probability --judge-accuracy on ordered pairs and --tie-accuracy on tied pairs
              (a wrong answer is one of the two others at random), and malformed with probability --malformed.
              Advantages: engine.algo.advantages.tie_aware_advantages. Rows vary the robustness to judge errors
              (engine.algo.advantages.pairwise_rewards): the dead zone reward.judge.tie_margin (a response within
              that many net verdicts of 0 is tied), the group tie test reward.judge.group_tie_frac, and
              both-orders agreement (reward.judge.order_rule=agree). "missed" = ordered responses given 0.
  real judge  the same path with the judge model served by the rollout decode loop: the tiny Qwen3-MoE (random
              init), on --real-groups groups. It cannot judge: this row shows the plumbing and that unparseable
              verdicts become recorded failures (zero advantage), not what a trained judge would do.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import replace

import numpy as np

from configs.schema import JudgeConfig


class SimulatedJudge:
    """A judge backend (``generate(prompts) -> texts``) of known accuracy that reads qualities from the prompt."""

    def __init__(self, accuracy: float, tie_accuracy: float, malformed: float, seed: int) -> None:
        self.accuracy, self.tie_accuracy, self.malformed = accuracy, tie_accuracy, malformed
        self.rng, self.calls = random.Random(seed), 0

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        out = []
        for p in prompts:
            self.calls += 1
            qa, qb = (int(x) for x in re.findall(r"Response [AB]: quality (\d)", p))
            true = (qa > qb) - (qa < qb)
            if self.rng.random() < self.malformed:
                out.append("I am not sure about this one.")
                continue
            right = self.rng.random() < (self.tie_accuracy if true == 0 else self.accuracy)
            v = true if right else self.rng.choice([x for x in (1, 0, -1) if x != true])
            out.append(f"A is compared with B.\nVerdict: {['Worse', 'Tie', 'Better'][v + 1]}")
        return out


def make_groups(num: int, size: int, all_same_frac: float, rng: np.random.Generator) -> np.ndarray:
    """int [num, size] qualities in {0, 1, 2}."""
    q = rng.integers(0, 3, size=(num, size))
    same = rng.random(num) < all_same_frac
    q[same] = rng.integers(0, 3, size=(int(same.sum()), 1))
    return q


def true_signs(q: np.ndarray) -> np.ndarray:
    beats = (q[:, :, None] > q[:, None, :]).sum(-1) - (q[:, :, None] < q[:, None, :]).sum(-1)
    t = np.sign(beats)
    assert np.array_equal(t, np.sign(q * q.shape[1] - q.sum(1, keepdims=True))), "rank and mean signs disagree"
    return t


def inversions(adv: np.ndarray, t: np.ndarray) -> dict:
    s = np.sign(adv)
    wrong = np.where(t != 0, s == -t, s != 0)
    ties = t == 0
    all_tie = np.broadcast_to((t == 0).all(1, keepdims=True), t.shape)  # every response of the group ties
    return {"inversion_rate": float(wrong.mean()), "inversion_rate_ordered": float(wrong[~ties].mean()),
            "tie_inversions": int(wrong[ties].sum()),
            "tie_inversion_rate": float(wrong[ties].mean()) if ties.any() else 0.0,
            "tie_inversions_all_tie_groups": int(wrong[all_tie].sum()),
            "missed_rate": float(((s == 0) & (t != 0)).sum() / max((t != 0).sum(), 1)),
            "num_responses": int(t.size), "num_true_ties": int(ties.sum())}


def judge_advantages(q: np.ndarray, backend, spec: JudgeConfig, seed: int) -> tuple[np.ndarray, dict]:
    import torch

    from engine.algo.advantages import tie_aware_advantages
    from engine.rewards.judge import judge_group

    rewards, valid, calls, failures = [], [], 0, 0
    for n, row in enumerate(q):
        out = judge_group(backend, spec, question="Which response is better?", reference="quality 1",
                          responses=[f"quality {x} (response {k})" for k, x in enumerate(row)], seed=seed + n)
        rewards.append(out.rewards)
        valid.append(out.valid)
        calls += out.parts["judge_calls"]
        failures += out.parts["judge_parse_failures"]
    adv = tie_aware_advantages(torch.tensor(rewards), torch.tensor(valid)).numpy()
    return adv, {"judge_calls_per_group": calls / len(q), "parse_failure_rate": failures / max(calls, 1),
                 "valid_frac": float(np.mean(valid))}


class _TinyJudge:
    """The tiny random-init Qwen3-MoE as judge, through the rollout backend (HFBackend + engine/modeling/decode.py)."""

    def __init__(self, seed: int) -> None:
        import tempfile

        from engine.backends.hf import CharJudgeTokenizer, HFJudgeBackend
        from configs.schema import ModelConfig
        from engine.modeling.model import build_model, save_model
        from engine.data.tasks import CharTokenizer

        tok = CharTokenizer()
        self._dir = tempfile.TemporaryDirectory(prefix="everyprompt-judge-")
        save_model(build_model(ModelConfig(max_position_embeddings=512), tok.vocab_size, seed=seed), self._dir.name)
        self.backend = HFJudgeBackend(self._dir.name, tokenizer=CharJudgeTokenizer(tok), seed=seed)

    def generate(self, prompts, *, max_new_tokens, temperature):
        return self.backend.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature)


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench reward-inversion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=2000, help="simulated groups")
    p.add_argument("--group-size", type=int, default=8, help="responses per group")
    p.add_argument("--all-same-frac", type=float, default=0.2, help="groups whose responses all tie")
    p.add_argument("--noise", type=float, default=0.5, help="scalar reward noise std (quality levels 1 apart)")
    p.add_argument("--noises", default="0.1,0.25,1.0", help="more scalar noise levels to show")
    p.add_argument("--judge-accuracy", type=float, default=0.85, help="on ordered pairs (paper: 84.3%% vs GPT-4)")
    p.add_argument("--tie-accuracy", type=float, default=0.988, help="on tied pairs (paper: 98.8%%)")
    p.add_argument("--malformed", type=float, default=0.02, help="fraction of unparseable judge outputs")
    p.add_argument("--budget", type=int, default=12, help="judge calls per group for the budgeted row")
    p.add_argument("--real-groups", type=int, default=4, help="groups judged by the tiny model (0 = skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated qualities, noise and judge errors")
    a = p.parse_args(argv)
    import torch  # torch only after parsing: --help and argument errors answer at once

    from engine.algo.advantages import group_advantages

    rng = np.random.default_rng(a.seed)
    q = make_groups(a.groups, a.group_size, a.all_same_frac, rng)
    t = true_signs(q)
    rows: dict[str, dict] = {}
    for noise in [a.noise] + [float(x) for x in a.noises.split(",") if x]:
        r = torch.tensor(q + rng.normal(0.0, noise, q.shape), dtype=torch.float64)
        rows[f"scalar noise={noise:g}"] = inversions(group_advantages(r).numpy(), t)
    full = JudgeConfig(max_calls_per_group=0)  # the defaults: tie_margin=1, group_tie_frac=0.1
    d = f"margin={full.tie_margin:g} group={full.group_tie_frac:g}"

    def rr(**kw) -> JudgeConfig:
        return replace(full, **kw)

    acc, tie, bad = a.judge_accuracy, a.tie_accuracy, a.malformed
    sims = {  # name -> (spec, accuracy, tie accuracy, malformed); the first is the headline (the default config)
        f"tie-aware round-robin {d} (default)": (full, acc, tie, bad),
        "round-robin, no robustness (margin=0 group=0)": (rr(tie_margin=0, group_tie_frac=0), acc, tie, bad),
        "round-robin, group tie test only (group=0.1)": (rr(tie_margin=0), acc, tie, bad),
        "round-robin margin=2": (rr(tie_margin=2), acc, tie, bad),
        "round-robin margin=3": (rr(tie_margin=3), acc, tie, bad),
        "round-robin margin=4": (rr(tie_margin=4), acc, tie, bad),
        "round-robin both orders agree, margin=1": (rr(both_orders=True, order_rule="agree"), acc, tie, bad),
        "round-robin both orders agree, margin=2": (rr(both_orders=True, order_rule="agree", tie_margin=2), acc,
                                                    tie, bad),
        "round-robin, perfect judge, margin=0": (rr(tie_margin=0, group_tie_frac=0), 1.0, 1.0, 0.0),
        f"round-robin, perfect judge, {d}": (full, 1.0, 1.0, 0.0),
        f"round-robin tie=1 (perfect on ties), {d}": (full, acc, 1.0, bad),
        f"round-robin budget={a.budget}, {d}": (rr(max_calls_per_group=a.budget), acc, tie, bad),
        "tie-aware anchor (reference = quality 1)": (JudgeConfig(construction="anchor"), acc, tie, bad),
    }
    for name, (spec, acc_, tie_, bad_) in sims.items():
        backend = SimulatedJudge(acc_, tie_, bad_, a.seed)
        adv, stats = judge_advantages(q, backend, spec, a.seed)
        rows[name] = {**inversions(adv, t), **stats}
    if a.real_groups:
        adv, stats = judge_advantages(q[:a.real_groups], _TinyJudge(a.seed), JudgeConfig(max_calls_per_group=0),
                                      a.seed)
        rows["real judge path: tiny model (untrained)"] = {**inversions(adv, t[:a.real_groups]), **stats}

    print(f"{a.groups} groups x {a.group_size} responses, qualities in {{0,1,2}}, {a.all_same_frac:.0%} all-tie "
          f"groups; {int((t == 0).sum())} of {t.size} responses are true ties")
    print_table(["method", "inversions", "on ordered", "on ties", "tie inv.", "in all-tie groups", "missed",
                 "calls/group", "parse fail", "valid"],
                [[n, r["inversion_rate"], r["inversion_rate_ordered"], r["tie_inversion_rate"], r["tie_inversions"],
                  r["tie_inversions_all_tie_groups"], r["missed_rate"], r.get("judge_calls_per_group", "-"),
                  r.get("parse_failure_rate", "-"), r.get("valid_frac", 1.0)] for n, r in rows.items()])
    scalar, tie_aware = rows[f"scalar noise={a.noise:g}"], rows[next(iter(sims))]
    return {"config": vars(a), "methods": rows,
            "inversion_rate_scalar": scalar["inversion_rate"], "inversion_rate_tie_aware": tie_aware["inversion_rate"],
            "tie_inversions_scalar": scalar["tie_inversions"], "tie_inversions_tie_aware": tie_aware["tie_inversions"],
            "tie_inversion_rate_scalar": scalar["tie_inversion_rate"],
            "tie_inversion_rate_tie_aware": tie_aware["tie_inversion_rate"],
            "tie_inversions_tie_aware_perfect_judge": rows[f"round-robin, perfect judge, {d}"]["tie_inversions"],
            "tie_inversions_tie_aware_all_tie_groups": tie_aware["tie_inversions_all_tie_groups"],
            "missed_rate_tie_aware": tie_aware["missed_rate"],
            "tie_inversions_tie_aware_no_robustness": rows[list(sims)[1]]["tie_inversions"],
            "missed_rate_tie_aware_no_robustness": rows[list(sims)[1]]["missed_rate"],
            "num_true_ties": scalar["num_true_ties"]}
