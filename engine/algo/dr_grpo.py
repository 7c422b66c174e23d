"""Dr.GRPO ("Understanding R1-Zero-Like Training", arXiv 2503.20783), registered as ``learner.loss=dr_grpo``.

Dr.GRPO removes GRPO's two length/difficulty biases:
- the loss: GRPO's token-level PPO clip (engine.algo.losses.grpo_loss), but each response's token sum is divided by
  one constant, the generation limit (task.max_answer_tokens), not by its own length: aggregation
  ``seq_mean_token_sum_norm`` (verl ``loss_agg_mode=seq-mean-token-sum-norm``, TRL ``loss_type="dr_grpo"``), its
  default here. Any token-level loss may use that aggregation too (``learner.aggregation=seq_mean_token_sum_norm``).
- the advantage: R - mean(R) without dividing by the group's std (``group_advantages(..., scale_by_std=False)``
  in engine/algo/advantages.py).

This module and its line in engine/algo/loss_registry.py are all a new loss needs.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from engine.algo.loss_seam import LossInputs, PolicyLoss
from engine.algo.losses import grpo_loss


class DrGRPO(PolicyLoss):
    """learner.loss=dr_grpo: grpo_loss with learner.dr_grpo.clip_eps_low/high and dual_clip_c, normalised by the
    generation limit."""

    def __call__(self, x: LossInputs, batch: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(x.logp_NT, x.old_logp_NT, x.token_advantages(), x.mask_NT, clip_eps_low=self.cfg.clip_eps_low,
                         clip_eps_high=self.cfg.clip_eps_high, dual_clip_c=self.cfg.dual_clip_c, **self.reduction(x))
