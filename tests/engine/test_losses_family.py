import math

import pytest
import torch

from engine.algo.dr_grpo import DrGRPO
from engine.algo.espo import ESPO
from engine.algo.loss_registry import LOSSES
from engine.algo.loss_seam import LossInputs, PolicyLoss, build_loss, loss_class
from engine.algo.losses import CISPO, GRPO, GSPO, cispo_loss, grpo_loss, gspo_loss

pytestmark = pytest.mark.timeout(30)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_registry_holds_the_five_losses_and_the_common_call_works_for_each():
    assert [loss_class(n) for n in ("grpo", "gspo", "cispo", "espo", "dr_grpo")] == [GRPO, GSPO, CISPO, ESPO, DrGRPO]
    torch.manual_seed(0)
    old_NT = -torch.rand(3, 5)
    ent_NT = torch.rand(3, 5)
    mask_NT = torch.rand(3, 5) > 0.3
    for name, entry in LOSSES.items():
        loss_fn = build_loss(name, entry.config(), aggregation="token_mean", vocab_size=1000, norm_len=5)
        assert isinstance(loss_fn, PolicyLoss) and loss_fn.aggregation == "token_mean"
        logp_NT = _leaf(old_NT + 0.01 * torch.randn(3, 5))
        loss, stats = loss_fn(LossInputs(logp_NT, old_NT, torch.randn(3), mask_NT, entropy_NT=ent_NT))
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert torch.all(logp_NT.grad[~mask_NT] == 0), name
        assert {"clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_max"} <= set(stats)
        assert all(not v.requires_grad and v.dim() == 0 for v in stats.values()), name


@pytest.mark.parametrize("name", ["grpo", "gspo", "cispo", "dr_grpo"])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_on_policy_value_and_gradient_equal_grpo(name, agg):
    # logp == old_logp: every ratio is 1, so all these losses are -mean(A) with gradient -A * weight
    torch.manual_seed(1)
    old_NT = -torch.rand(4, 4)
    mask_NT = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv_N = torch.tensor([1.0, -2.0, 0.5, 3.0])
    ref_lp, got_lp = _leaf(old_NT), _leaf(old_NT)
    ref, _ = grpo_loss(ref_lp, old_NT, adv_N, mask_NT, aggregation=agg)
    built = build_loss(name, LOSSES[name].config(), aggregation=agg, vocab_size=100, norm_len=4)
    got, stats = built(LossInputs(got_lp, old_NT, adv_N, mask_NT))
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_lp.grad, ref_lp.grad)
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0


def test_gspo_hand_computed_sequence_ratio_and_clip():
    # one response, 2 tokens, log-ratios 0.1 and -0.3: s = exp(-0.1), below 1 - 3e-4
    old_NT = torch.tensor([[-1.0, -2.0, -5.0]])
    mask_NT = torch.tensor([[1, 1, 0]])
    for adv, clipped in ((1.0, False), (-1.0, True)):
        logp_NT = _leaf(old_NT + torch.tensor([[0.1, -0.3, 7.0]]))
        loss, stats = gspo_loss(logp_NT, old_NT, torch.tensor([adv]), mask_NT)
        loss.backward()
        s = math.exp(-0.1)
        torch.testing.assert_close(stats["ratio_mean"], torch.tensor(s))
        if clipped:  # A < 0, s < 1 - eps_low: the clip binds, the whole sequence loses its gradient
            torch.testing.assert_close(loss, torch.tensor(-adv * (1 - 3e-4)))
            assert torch.all(logp_NT.grad == 0)
            assert stats["clip_frac_low"] == 1
        else:  # unclipped: gradient s * A * dlogp_t / |y| for each token (GSPO-token)
            torch.testing.assert_close(loss, torch.tensor(-adv * s))
            torch.testing.assert_close(logp_NT.grad, torch.tensor([[-adv * s / 2, -adv * s / 2, 0.0]]))
            assert stats["clip_frac"] == 0


def test_gspo_per_token_advantages_weight_each_token_by_its_own_advantage():
    old_NT = torch.zeros(1, 3)
    logp_NT = _leaf(torch.tensor([[1e-4, -1e-4, 0.0]]))  # mean log-ratio 0 -> s = 1, inside the clip
    adv_NT = torch.tensor([[1.0, 2.0, -3.0]])
    loss, _ = gspo_loss(logp_NT, old_NT, adv_NT, torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.0))
    torch.testing.assert_close(logp_NT.grad, -adv_NT / 3)


def test_gspo_gradcheck_float64_inside_the_clip():
    torch.manual_seed(2)
    old_NT = -torch.rand(3, 4, dtype=torch.float64)
    logp_NT = _leaf(old_NT + 0.05 * torch.randn(3, 4, dtype=torch.float64))
    mask_NT = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv_N = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    fn = lambda lp: gspo_loss(lp, old_NT, adv_N, mask_NT, clip_eps_low=0.5, clip_eps_high=0.5)[0]
    assert torch.autograd.gradcheck(fn, (logp_NT,))


@pytest.mark.parametrize("fn", [gspo_loss, cispo_loss, grpo_loss])
@pytest.mark.parametrize("shift", [1e4, -1e4, 60.0, -60.0])
def test_extreme_ratios_and_inf_padding_stay_finite(fn, shift):
    old_NT = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    logp = old_NT + shift
    logp[1, 1:] = float("-inf")  # padding may hold anything
    logp_NT = _leaf(logp)
    mask_NT = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = fn(logp_NT, old_NT, torch.tensor([1.0, -1.0]), mask_NT)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logp_NT.grad))
    assert torch.all(logp_NT.grad[mask_NT == 0] == 0)
    assert all(torch.isfinite(v) for v in stats.values())


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_clipped_weight():
    old_NT = torch.zeros(1, 3)
    logp_NT = _leaf(torch.tensor([[2.0, -2.0, 0.1]]))  # r = e^2 (clipped to 1.28), e^-2 (to 0.8), 1.105
    adv = 1.0
    loss, stats = cispo_loss(logp_NT, old_NT, torch.tensor([adv]), torch.ones(1, 3),
                             clip_eps_low=0.2, clip_eps_high=0.28)
    loss.backward()
    w = torch.tensor([[1.28, 0.8, math.exp(0.1)]])
    torch.testing.assert_close(loss, -(adv * w).mean())
    torch.testing.assert_close(logp_NT.grad, -adv * w / 3)  # every token keeps a gradient, unlike PPO-clip
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(1 / 3))
    torch.testing.assert_close(stats["clip_frac_low"], torch.tensor(1 / 3))  # counted whatever the sign of A


def test_cispo_default_has_no_lower_bound_and_gradcheck_matches_unclipped_ppo():
    torch.manual_seed(3)
    old_NT = -torch.rand(2, 3, dtype=torch.float64)
    logp_NT = _leaf(old_NT + 0.3 * torch.randn(2, 3, dtype=torch.float64) - 0.5)
    adv_N = torch.tensor([1.5, -0.5], dtype=torch.float64)
    mask_NT = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # inside the clip the CISPO gradient is that of -A * r, the unclipped surrogate
    fn = lambda lp: cispo_loss(lp, old_NT, adv_N, mask_NT)[0]
    assert torch.autograd.gradcheck(fn, (logp_NT,))
    _, stats = cispo_loss(logp_NT, old_NT, adv_N, mask_NT)
    assert stats["clip_frac"] == 0


@pytest.mark.parametrize("fn", [grpo_loss, gspo_loss, cispo_loss])
def test_denom_makes_shards_sum_to_the_whole_batch_loss(fn):
    torch.manual_seed(4)
    old_NT, logp_NT = -torch.rand(6, 5), -torch.rand(6, 5)
    adv_N, mask_NT = torch.randn(6), torch.rand(6, 5) > 0.4
    mask_NT[:, 0] = True
    for agg, count in (("token_mean", mask_NT.sum()), ("seq_mean_token_mean", torch.tensor(6))):
        whole, _ = fn(logp_NT, old_NT, adv_N, mask_NT, aggregation=agg)
        parts = [fn(logp_NT[s], old_NT[s], adv_N[s], mask_NT[s], aggregation=agg, denom=count)[0]
                 for s in (slice(0, 2), slice(2, 6))]
        torch.testing.assert_close(sum(parts), whole)


def test_bad_advantage_shape_is_rejected():
    for fn in (gspo_loss, cispo_loss):
        with pytest.raises(ValueError, match="advantages"):
            fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))
