"""Every registered loss ignores padded positions (mask 0) entirely: NaN or +-inf log-probs, advantages or entropies
there change neither the loss nor its gradient (issue 19, defect 2)."""

import pytest
import torch

from engine.algo.loss_registry import LOSSES
from engine.algo.loss_seam import LossInputs, build_loss
from engine.algo.transforms import decoupled_weights, rl_zvp

pytestmark = pytest.mark.timeout(30)

CASES = [(name, agg) for name, entry in LOSSES.items() for agg in entry.aggregations]
GARBAGE = {"nan": (float("nan"), float("nan")), "inf": (float("inf"), float("inf")),
           "-inf": (float("-inf"), float("-inf")), "mixed": (float("inf"), float("-inf"))}


def _clean():
    g = torch.Generator().manual_seed(0)
    mask_NT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    old_NT = -torch.rand(3, 5, generator=g)
    logp_NT = old_NT + 0.3 * torch.randn(3, 5, generator=g)
    adv_NT = torch.randn(3, 5, generator=g)
    ent_NT = torch.rand(3, 5, generator=g) * 2
    return logp_NT, old_NT, adv_NT, ent_NT, mask_NT


def _run(name, agg, logp_NT, old_NT, adv_NT, ent_NT, mask_NT, weight_NT=None):
    loss_fn = build_loss(name, LOSSES[name].config(), aggregation=agg, vocab_size=10, norm_len=6)
    lp = logp_NT.detach().clone().requires_grad_(True)
    loss, stats = loss_fn(LossInputs(lp, old_NT, adv_NT, mask_NT, entropy_NT=ent_NT, weight_NT=weight_NT))
    loss.backward()
    return loss, lp.grad, stats


@pytest.mark.parametrize("name,agg", CASES)
@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_padding_never_reaches_the_loss_or_its_gradient(name, agg, garbage):
    logp_NT, old_NT, adv_NT, ent_NT, mask_NT = _clean()
    want_loss, want_grad, want_stats = _run(name, agg, logp_NT, old_NT, adv_NT, ent_NT, mask_NT)
    a, b = GARBAGE[garbage]
    pad = ~mask_NT
    dirty = [torch.where(pad, torch.full_like(x, v), x) for x, v in
             ((logp_NT, a), (old_NT, b), (adv_NT, a), (ent_NT, b))]
    weight_NT = torch.where(pad, torch.full_like(logp_NT, a), torch.ones_like(logp_NT))
    loss, grad, stats = _run(name, agg, *dirty, mask_NT, weight_NT=weight_NT)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    assert (grad[pad] == 0).all()
    for key, value in want_stats.items():
        torch.testing.assert_close(stats[key], value, msg=f"{name}: stat {key}")


def test_advantage_transforms_keep_padding_out_of_their_sums():
    logp_NT, old_NT, _, ent_NT, mask_NT = _clean()
    nan_NT = torch.full_like(logp_NT, float("nan"))
    pad = ~mask_NT
    x = LossInputs(logp_NT, torch.where(pad, nan_NT, old_NT), torch.tensor([1.0, -1.0, 0.0]), mask_NT,
                   entropy_NT=torch.where(pad, nan_NT, ent_NT))
    x, zvp_sums = rl_zvp(x, torch.tensor([0, 0, 1]), alpha=0.1)
    x, is_sums = decoupled_weights(x, torch.where(pad, nan_NT, logp_NT), cap=2.0)
    for total, weight in {**zvp_sums, **is_sums}.values():
        assert torch.isfinite(total) and torch.isfinite(weight)
    assert torch.isfinite(x.token_advantages()[mask_NT]).all()
    for name in LOSSES:
        loss, grad, _ = _run(name, LOSSES[name].default_aggregation, logp_NT, x.old_logp_NT, x.adv, x.entropy_NT,
                             mask_NT, weight_NT=x.weight_NT)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[pad] == 0).all()
