"""The rollout stage of zero-variance elimination (ALGORITHMS.md B.2): adaptive group size N and top-ups.

Pure bookkeeping: no I/O, no clocks. engine/coordinator/loop.py asks ``group_size`` for each admitted prompt and
``after_group`` for each complete group, and sends the samples itself. Both are paid for from one budget:
``rollout.extra_sample_frac`` x the base samples (``rollout.group_size`` per admitted group).

- Adaptive N (``rollout.adaptive_group_size``): a prompt likely to come out zero-variance gets more samples, up to
  ``rollout.max_group_size``: by its offline pass rate p when the pool has one (P(all N agree) = p^N + (1-p)^N,
  raised until it is <= ``rollout.zv_target``), else by its source's EMA zero-variance rate.
- Top-up (``rollout.top_up`` > 0): a group whose samples all agree in raw correctness (never the shaped reward)
  gets that many more samples, once.
"""

from __future__ import annotations

from configs.schema import RolloutConfig
from engine.algo.shaping import is_zero_variance
from engine.coordinator.buffer import Group
from engine.coordinator.counters import RolloutCounters


class ZeroVarianceSampler:
    def __init__(self, rollout: RolloutConfig, counters: RolloutCounters, *, ema: float = 0.1) -> None:
        self.cfg, self._counters, self._ema = rollout, counters, ema  # ema: weight of the newest group
        self.source_zv: dict[str, float] = {}  # per-source EMA of the raw zero-variance rate
        self._topped_up: set[str] = set()

    def extra_budget(self) -> int:
        """Extra samples (adaptive N and top-ups) still allowed."""
        c = self._counters
        spent = c.adaptive_extra_samples + c.top_up_samples
        return int(self.cfg.extra_sample_frac * c.base_samples) - spent

    def group_size(self, prompt_source: str, pass_rate: float | None) -> int:
        """Samples for a newly admitted prompt: rollout.group_size, raised within the budget (adaptive N)."""
        base, cfg = self.cfg.group_size, self.cfg
        self._counters.base_samples += base
        if not cfg.adaptive_group_size:
            return base
        if pass_rate is not None:
            p = pass_rate
            sizes = [n for n in range(base, cfg.max_group_size + 1) if p ** n + (1 - p) ** n <= cfg.zv_target]
            want = sizes[0] if sizes else cfg.max_group_size
        else:
            want = cfg.max_group_size if self.source_zv.get(prompt_source, 0.0) > cfg.zv_target else base
        extra = max(min(want - base, self.extra_budget()), 0)
        self._counters.adaptive_extra_samples += extra
        return base + extra

    def after_group(self, g: Group) -> int:
        """A complete RL group: update its source's zero-variance rate (from its first samples, once); returns how
        many samples to add to it (a top-up; 0 = none, the group is done)."""
        correct = [s.reward_parts.get("correct", s.reward) for s in g.ordered() if s.valid]
        if g.group_id not in self._topped_up:
            zv = float(is_zero_variance(correct[:g.initial_samples]))
            old = self.source_zv.get(g.source)
            self.source_zv[g.source] = zv if old is None else (1 - self._ema) * old + self._ema * zv
        n = self.cfg.top_up
        if not n or g.group_id in self._topped_up or not is_zero_variance(correct) or self.extra_budget() < n:
            return 0
        self._topped_up.add(g.group_id)
        self._counters.top_up_samples += n
        return n
