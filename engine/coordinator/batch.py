"""Turn finished groups into one TrainBatch (advantages included) and describe it for the step's metrics."""

from __future__ import annotations

import numpy as np
import torch

from engine.algo.advantages import group_advantages, tie_aware_advantages
from engine.rewards.judge import JUDGE_PART
from engine.coordinator.buffer import Group
from engine.coordinator.counters import RolloutCounters
from engine.algo.shaping import is_zero_variance
from engine.modeling.routing import pack_routes
from transport import TrainBatch


def pack_batch(groups: list[Group], *, step: int, pad_id: int, scale_by_std: bool = True,
               adv_std: str = "population") -> TrainBatch:
    """Right-pad prompt+response of every sample to one length L; advantages per ESPO Eq. 11 (without the
    division by the group's std when ``scale_by_std`` is False: Dr.GRPO; ``adv_std``: learner.adv_std, the
    population or unbiased std); RL-ZVP signs per sample (0 for a verifier-invalid one); MoE routes (when the
    rollout recorded them) aligned with the tokens they belong to."""
    samples = [s for g in groups for s in g.ordered()]
    # [N]; groups may differ in size
    adv = np.concatenate([_advantages(g, scale_by_std, adv_std) for g in groups]).astype(np.float32)
    zvp_sign = np.array([_zvp_sign(g) if s.valid else 0 for g in groups for s in g.ordered()], dtype=np.int8)
    prompt_lens = np.array([len(g.prompt_ids) for g in groups for _ in g.ordered()], dtype=np.int32)
    response_lens = np.array([len(s.token_ids) for s in samples], dtype=np.int32)
    n, length = len(samples), int((prompt_lens + response_lens).max())
    input_ids = np.full((n, length), pad_id, dtype=np.int32)
    behavior = np.zeros((n, length), dtype=np.float32)
    versions = np.full((n, length), -1, dtype=np.int32)
    i = 0
    for g in groups:
        for s in g.ordered():
            p, t = len(g.prompt_ids), len(s.token_ids)
            input_ids[i, :p], input_ids[i, p:p + t] = g.prompt_ids, s.token_ids
            behavior[i, p:p + t] = s.behavior_logprobs
            versions[i, p:p + t] = s.token_versions
            i += 1
    routes, routed = pack_routes([(g.prompt_routes, s.routes) if g.prompt_routes is not None
                                  and s.routes is not None else None for g in groups for s in g.ordered()], length)
    return TrainBatch(step=step, input_ids=input_ids, prompt_lens=prompt_lens, response_lens=response_lens,
                      behavior_logprobs=behavior, token_versions=versions, advantages=adv, routes=routes,
                      routed_lens=routed, zvp_sign=zvp_sign)


def _advantages(g: Group, scale_by_std: bool, adv_std: str) -> np.ndarray:
    samples = g.ordered()
    rewards = torch.tensor([[s.reward for s in samples]], dtype=torch.float32)
    valid = torch.tensor([[s.valid for s in samples]], dtype=torch.bool)
    if any(JUDGE_PART in s.reward_parts for s in samples):  # judge margins: a tie gets exactly 0 (spec B.5)
        return tie_aware_advantages(rewards, valid, std=adv_std)[0].numpy()
    return group_advantages(rewards, valid, scale_by_std=scale_by_std, std=adv_std)[0].numpy()


def _correct(g: Group) -> list[float]:
    return [s.reward_parts.get("correct", s.reward) for s in g.ordered() if s.valid]


def _zvp_sign(g: Group) -> int:
    """For RL-ZVP (actor stage): +1 / -1 when the group's shaped rewards carry no signal (zero advantage for
    all), by whether its raw correctness is high or low; 0 for an informative group. pack_batch gives it to the
    group's valid members only: an invalid one gets 0, as in Eq. 11 and rl_zvp_advantages."""
    if not is_zero_variance([s.reward for s in g.ordered() if s.valid]) or not _correct(g):
        return 0
    return 1 if float(np.mean(_correct(g))) >= 0.5 else -1


def batch_stats(groups: list[Group], batch: TrainBatch, *, learner_version: int, rl_zvp: bool = False
                ) -> dict[str, float]:
    """Reward, accuracy, per-token policy lag and the zero-variance rate after each stage of elimination, for
    what the learner is about to train on. Zero-variance tests use raw correctness except ``zv_rate_shaped``:
    ``zv_rate_first`` (the first rollout.group_size samples), ``zv_rate_raw`` (after top-ups),
    ``zv_rate_shaped`` (the shaped rewards, i.e. zero advantage), ``zv_rate_final`` (no gradient at all: shaped
    zero variance left without RL-ZVP). ``wasted_sample_frac``: samples that contribute no gradient."""
    samples = [s for g in groups for s in g.ordered()]
    rewards = np.array([s.reward for s in samples], dtype=np.float64)
    correct = np.array([s.reward_parts.get("correct", s.reward) for s in samples], dtype=np.float64)
    zv_first = [is_zero_variance([s.reward_parts.get("correct", s.reward) for s in g.ordered()[:g.initial_samples]
                                  if s.valid]) for g in groups]
    zero_var = [is_zero_variance(_correct(g)) for g in groups]
    shaped_zv = [_zvp_sign(g) != 0 or not _correct(g) for g in groups]
    final_zv = [z and not (rl_zvp and _zvp_sign(g) != 0) for z, g in zip(shaped_zv, groups)]
    wasted = sum(g.num_samples if z else sum(not s.valid for s in g.ordered()) for z, g in zip(final_zv, groups))
    token_versions = batch.token_versions[batch.token_versions >= 0]
    lag = learner_version - token_versions if token_versions.size else np.zeros(1)
    # what the routes cost on the rollout -> coordinator wire: prompt routes once per group, then per token
    route_bytes = sum((g.prompt_routes.nbytes if g.prompt_routes is not None else 0)
                      + sum(s.routes.nbytes for s in g.ordered() if s.routes is not None) for g in groups)
    lags = lag.astype(np.int64)
    partial = [len(np.unique(s.token_versions)) > 1 for s in samples]
    return {
        "reward": float(rewards.mean()),
        "accuracy": float(correct.mean()),
        "zero_variance_rate": float(np.mean(zero_var)),
        "zv_rate_first": float(np.mean(zv_first)),
        "zv_rate_raw": float(np.mean(zero_var)),
        "zv_rate_shaped": float(np.mean(shaped_zv)),
        "zv_rate_final": float(np.mean(final_zv)),
        "wasted_sample_frac": wasted / max(len(samples), 1),
        "group_size_mean": len(samples) / max(len(groups), 1),
        "response_len": float(batch.response_lens.mean()),
        "mean_response_tokens": float(batch.response_lens.mean()),  # the same mean, named for long-response runs
        "p99_response_tokens": float(np.percentile(batch.response_lens, 99)) if batch.response_lens.size else 0.0,
        "num_samples": len(samples),
        "version_lag_mean": float(lag.mean()),
        "version_lag_max": int(lag.max()),
        "staleness_hist": np.bincount(lags, minlength=1).tolist(),  # trained tokens by staleness 0, 1, ...
        "partial_sample_frac": float(np.mean(partial)),  # responses spanning more than one policy version
        "valid_frac": float(np.mean([s.valid for s in samples])),
        "route_bytes_per_token": route_bytes / max(int(batch.response_lens.sum()), 1),
        "routed_frac": float(np.mean(batch.routed_lens > 0)) if batch.routed_lens.size else 0.0,
        **_judge_stats(groups),
    }


def _judge_stats(groups: list[Group]) -> dict[str, float]:
    """reward.plugin=judge: judge generations, unparseable verdicts and ties per group; plugin failures."""
    firsts = [g.ordered()[0].reward_parts for g in groups if g.num_samples]
    out = {}
    if any(JUDGE_PART in p for p in firsts):
        for key in ("judge_calls", "judge_parse_failures", "judge_ties", "judge_error"):
            out[key + "_per_group"] = float(np.mean([p.get(key, 0.0) for p in firsts]))
    failed = [s for g in groups for s in g.ordered() if any(k.startswith("plugin_") for k in s.reward_parts)]
    out["plugin_failure_frac"] = len(failed) / max(sum(g.num_samples for g in groups), 1)  # raised / timed out
    return out


class RunStats:
    """What the run knows across steps (kept in checkpoints): the staleness totals of the summary. Constant size:
    a checkpoint of step 100,000 is as small as one of step 10 (per-prompt statistics, which nothing read, grew
    every checkpoint and the coordinator by every group; checkpoints that still hold them load)."""

    def __init__(self, max_token_staleness: int = 0, samples: int = 0, partial_samples: int = 0) -> None:
        self.max_token_staleness, self.samples, self.partial_samples = max_token_staleness, samples, partial_samples

    def add(self, groups: list[Group], stats: dict) -> None:
        n = sum(g.num_samples for g in groups)
        self.max_token_staleness = max(self.max_token_staleness, int(stats["version_lag_max"]))
        self.samples += n
        self.partial_samples += round(stats["partial_sample_frac"] * n)

    def summary(self, counts: RolloutCounters) -> dict:
        return {"max_token_staleness": self.max_token_staleness, "samples_over_bound": counts.samples_over_bound,
                "discarded_samples": counts.discarded_samples,
                "partial_sample_frac": self.partial_samples / max(self.samples, 1)}

    def to_dict(self) -> dict:
        return vars(self).copy()

    @classmethod
    def from_dict(cls, d: dict) -> "RunStats":
        return cls(**{k: v for k, v in d.items() if k != "prompts"})  # "prompts": written before 2026-12-04
