"""Loss conventions users of verl/TRL expect (issue 19, defect 6): Dr.GRPO's constant normaliser on any token-level
loss, verl's dual clip on the PPO-style losses and GSPO's sequence form. Expected values are computed by hand."""

import math

import pytest
import torch

from configs.load import load
from engine.algo.loss_registry import LOSSES, GRPOConfig, GSPOConfig
from engine.algo.loss_seam import LossInputs, build_loss
from engine.algo.losses import grpo_loss, gspo_loss

pytestmark = pytest.mark.timeout(30)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_grpo_with_the_dr_grpo_aggregation_divides_each_sum_by_the_generation_limit():
    # on policy, per-token loss = -A; responses of 2 and 1 tokens, limit 5: (-(1 + 1) / 5 + 3 / 5) / 2
    old_NT = torch.zeros(2, 3)
    mask_NT = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss_fn = build_loss("grpo", GRPOConfig(), aggregation="seq_mean_token_sum_norm", vocab_size=10, norm_len=5)
    lp = _leaf(old_NT)
    loss, _ = loss_fn(LossInputs(lp, old_NT, torch.tensor([1.0, -3.0]), mask_NT))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.1))
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.1, -0.1, 0.0], [0.3, 0.0, 0.0]]))


def test_dual_clip_bounds_negative_advantage_tokens_by_c_times_abs_a():
    # ratios 4, 2, 0.5 with A = -1: PPO clip gives losses 4, 2, 0.8; the dual clip (c = 3) caps the first at 3 and
    # removes its gradient. A token with A = +1 and ratio 4 is clipped high as usual (-1.28) and not touched.
    old_NT = torch.zeros(2, 3)
    logp_NT = torch.tensor([[math.log(4), math.log(2), math.log(0.5)], [math.log(4), 0.0, 0.0]])
    mask_NT = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv_N = torch.tensor([-1.0, 1.0])
    got = {}
    for c in (0.0, 3.0):
        lp = _leaf(logp_NT)
        loss, stats = grpo_loss(lp, old_NT, adv_N, mask_NT, dual_clip_c=c)
        loss.backward()
        got[c] = loss, lp.grad, stats
    torch.testing.assert_close(got[0.0][0], torch.tensor((4 + 2 + 0.8 - 1.28) / 4))
    torch.testing.assert_close(got[3.0][0], torch.tensor((3 + 2 + 0.8 - 1.28) / 4))
    torch.testing.assert_close(got[0.0][1], torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]))  # d r / d logp = r
    torch.testing.assert_close(got[3.0][1], torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    assert "clip_frac_dual" not in got[0.0][2]
    torch.testing.assert_close(got[3.0][2]["clip_frac_dual"], torch.tensor(0.25))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "gspo", "espo"])
@pytest.mark.parametrize("c,want", [(3.0, 3.0), (5.0, 4.0)])
def test_every_ppo_style_loss_offers_the_dual_clip(name, c, want):
    # one response of two tokens, both with ratio 4 (so every ratio form reads 4), A = -1: loss min(4, c)
    old_NT = torch.zeros(1, 2)
    lp = _leaf(torch.full((1, 2), math.log(4)))
    cfg = LOSSES[name].config(dual_clip_c=c)
    loss_fn = build_loss(name, cfg, vocab_size=10, norm_len=2)  # dr_grpo: token sum 2 * loss / norm_len 2
    loss, _ = loss_fn(LossInputs(lp, old_NT, torch.tensor([-1.0]), torch.ones(1, 2), entropy_NT=torch.ones(1, 2)))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(want))
    assert bool((lp.grad == 0).all()) == (c < 4)


def test_dual_clip_config():
    assert load(["learner.loss=grpo", "learner.grpo.dual_clip_c=3"]).learner.grpo.dual_clip_c == 3
    assert GRPOConfig().dual_clip_c == 0.0  # off by default: the spec's plain PPO clip
    with pytest.raises(ValueError, match="dual_clip_c=0.5 is invalid"):
        GRPOConfig(dual_clip_c=0.5)


def _gspo(form, logp_NT, adv, mask_NT=None, **kw):
    lp = _leaf(logp_NT)
    mask_NT = torch.ones_like(logp_NT) if mask_NT is None else mask_NT
    loss, stats = gspo_loss(lp, torch.zeros_like(logp_NT), adv, mask_NT, form=form, **kw)
    loss.backward()
    return loss, lp.grad


def test_gspo_sequence_form_uses_one_advantage_and_the_sequence_ratio_gradient():
    # s = exp(mean(0.1, -0.1)) = 1, token advantages 1 and 3: the token form weighs each token by its own
    # advantage (gradient -A_t / 2), the sequence form by the sequence's mean advantage 2 (gradient -2 * 1/2)
    logp_NT, adv_NT = torch.tensor([[0.1, -0.1]]), torch.tensor([[1.0, 3.0]])
    loss, grad = _gspo("token", logp_NT, adv_NT)
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    torch.testing.assert_close(grad, torch.tensor([[-0.5, -1.5]]))
    loss, grad = _gspo("sequence", logp_NT, adv_NT)
    torch.testing.assert_close(loss, torch.tensor(-2.0))
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0]]))


def test_gspo_sequence_form_clips_at_the_sequence_level():
    # s = e^0.1 > 1 + 4e-4. Token advantages 1 and -3: the token form clips the A > 0 token only (no gradient) and
    # keeps 3 s for the other; the sequence form sees A_i = -1 < 0, so the clip does not bind: loss s, gradient s/2
    s = math.exp(0.1)
    logp_NT, adv_NT = torch.tensor([[0.1, 0.1]]), torch.tensor([[1.0, -3.0]])
    loss, grad = _gspo("token", logp_NT, adv_NT)
    torch.testing.assert_close(loss, torch.tensor((-(1 + 4e-4) + 3 * s) / 2))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.5 * s]]))
    loss, grad = _gspo("sequence", logp_NT, adv_NT)
    torch.testing.assert_close(loss, torch.tensor(s))
    torch.testing.assert_close(grad, torch.tensor([[s / 2, s / 2]]))
    loss, grad = _gspo("sequence", logp_NT, torch.tensor([1.0]))  # A > 0: clipped, no gradient for the sequence
    torch.testing.assert_close(loss, torch.tensor(-(1 + 4e-4)))
    assert (grad == 0).all()


def test_gspo_forms_agree_for_per_sequence_advantages():
    g = torch.Generator().manual_seed(1)
    logp_NT = 1e-3 * torch.randn(3, 4, generator=g)
    adv_N = torch.tensor([0.5, -1.0, 2.0])
    mask_NT = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    token = _gspo("token", logp_NT, adv_N, mask_NT)
    sequence = _gspo("sequence", logp_NT, adv_N, mask_NT)
    torch.testing.assert_close(sequence[0], token[0])
    torch.testing.assert_close(sequence[1], token[1])


def test_gspo_form_is_a_config_choice():
    assert GSPOConfig().form == "token"
    assert load(["learner.loss=gspo", "learner.gspo.form=sequence"]).learner.gspo.form == "sequence"
    with pytest.raises(ValueError, match="learner.gspo.form='x' is invalid"):
        GSPOConfig(form="x")
