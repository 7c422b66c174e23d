"""Turn finished groups into one TrainBatch (advantages included) and describe it for the step's metrics."""

from __future__ import annotations

import numpy as np
import torch

from engine.advantages import group_advantages
from engine.buffer import Group
from engine.routing import pack_routes
from transport import TrainBatch


def pack_batch(groups: list[Group], *, step: int, pad_id: int) -> TrainBatch:
    """Right-pad prompt+response of every sample to one length L; advantages per ESPO Eq. 11; MoE routes
    (when the rollout recorded them) aligned with the tokens they belong to."""
    samples = [s for g in groups for s in g.ordered()]
    rewards = torch.tensor([[s.reward for s in g.ordered()] for g in groups], dtype=torch.float32)  # [groups, G]
    valid = torch.tensor([[s.valid for s in g.ordered()] for g in groups], dtype=torch.bool)
    adv = group_advantages(rewards, valid).reshape(-1).numpy().astype(np.float32)  # [N]
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
                      routed_lens=routed)


def batch_stats(groups: list[Group], batch: TrainBatch, *, learner_version: int) -> dict[str, float]:
    """Reward, accuracy, zero-variance rate and per-token policy lag of what the learner is about to train on."""
    samples = [s for g in groups for s in g.ordered()]
    rewards = np.array([s.reward for s in samples], dtype=np.float64)
    correct = np.array([s.reward_parts.get("correct", s.reward) for s in samples], dtype=np.float64)
    zero_var = [len({s.reward for s in g.ordered() if s.valid}) <= 1 for g in groups]
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
        "response_len": float(batch.response_lens.mean()),
        "num_samples": len(samples),
        "version_lag_mean": float(lag.mean()),
        "version_lag_max": int(lag.max()),
        "staleness_hist": np.bincount(lags, minlength=1).tolist(),  # trained tokens by staleness 0, 1, ...
        "partial_sample_frac": float(np.mean(partial)),  # responses spanning more than one policy version
        "valid_frac": float(np.mean([s.valid for s in samples])),
        "route_bytes_per_token": route_bytes / max(int(batch.response_lens.sum()), 1),
        "routed_frac": float(np.mean(batch.routed_lens > 0)) if batch.routed_lens.size else 0.0,
    }


class RunStats:
    """What the run knows across steps (kept in checkpoints): the staleness totals of the summary, and per-prompt
    statistics (groups trained, samples, reward sum, zero-variance groups) keyed by prompt id."""

    def __init__(self, max_token_staleness: int = 0, samples: int = 0, partial_samples: int = 0,
                 prompts: dict | None = None) -> None:
        self.max_token_staleness, self.samples, self.partial_samples = max_token_staleness, samples, partial_samples
        self.prompts: dict[str, list[float]] = prompts or {}  # str keys: the checkpoint is JSON

    def add(self, groups: list[Group], stats: dict) -> None:
        n = sum(g.num_samples for g in groups)
        self.max_token_staleness = max(self.max_token_staleness, int(stats["version_lag_max"]))
        self.samples += n
        self.partial_samples += round(stats["partial_sample_frac"] * n)
        for g in groups:
            rewards = [s.reward_parts.get("correct", s.reward) for s in g.ordered()]
            entry = self.prompts.setdefault(str(g.prompt_id), [0, 0, 0.0, 0])
            entry[0] += 1
            entry[1] += len(rewards)
            entry[2] += float(sum(rewards))
            entry[3] += int(len(set(rewards)) <= 1)

    def summary(self, counts: dict[str, int]) -> dict:
        return {"max_token_staleness": self.max_token_staleness, "samples_over_bound": counts["samples_over_bound"],
                "discarded_samples": counts["discarded_samples"],
                "partial_sample_frac": self.partial_samples / max(self.samples, 1)}

    def to_dict(self) -> dict:
        return vars(self).copy()

    @classmethod
    def from_dict(cls, d: dict) -> "RunStats":
        return cls(**d)
