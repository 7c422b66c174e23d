import math

import pytest
import torch

from engine.algo.espo import batch_entropy_threshold, entropy_groups, espo_loss
from engine.algo.losses import gspo_loss

pytestmark = pytest.mark.timeout(30)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_sequence_groups_take_the_top_fraction_per_response_with_ties_high():
    ent_NT = torch.tensor([
        [0.1, 0.2, 3.0, 0.3, 0.4, 9.9],  # 5 trained tokens -> ceil(1.0) = 1 high
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # 6 tokens -> ceil(1.2) = 2 high
        [5.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 1 token -> it is high
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # all tied -> all high
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # no trained token -> nothing
    ])
    mask_NT = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6])
    hi_NT = entropy_groups(ent_NT, mask_NT, rho=0.2)
    expected = torch.tensor([
        [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6], dtype=torch.bool)
    assert torch.equal(hi_NT, expected)
    assert torch.equal(entropy_groups(ent_NT, mask_NT, rho=1.0), mask_NT.bool())  # K = 1
    # 15 tokens: 0.2 * 15 = 3.0000000000000004 in floats, must still give 3
    assert entropy_groups(torch.arange(15.0)[None], torch.ones(1, 15), rho=0.2).sum() == 3


def test_batch_scope_uses_one_threshold_for_all_responses():
    ent_NT = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [5.0, 6.0, 7.0, 8.0, 9.0]])
    mask_NT = torch.ones(2, 5)
    thr = batch_entropy_threshold(ent_NT, mask_NT, rho=0.2)  # 10 tokens -> top 2
    torch.testing.assert_close(thr, torch.tensor(8.0))
    hi_NT = entropy_groups(ent_NT, mask_NT, rho=0.2, scope="batch")
    assert hi_NT[0].sum() == 0 and torch.equal(hi_NT[1], torch.tensor([False, False, False, True, True]))
    # an explicit (e.g. all-gathered) threshold overrides this call's own
    assert entropy_groups(ent_NT, mask_NT, scope="batch", threshold=0.45).sum() == 6
    with pytest.raises(ValueError, match="scope"):
        entropy_groups(ent_NT, mask_NT, scope="global")


def test_on_policy_value_and_4_to_1_token_weights():
    # 5 tokens, one high-entropy token: weights 1/(2*1) for it, 1/(2*4) for each low token (A.9)
    ent_NT = torch.tensor([[0.1, 0.2, 3.0, 0.3, 0.4]])
    old_NT = -torch.rand(1, 5)
    logp_NT = _leaf(old_NT)
    adv = 2.0
    loss, stats = espo_loss(logp_NT, old_NT, torch.tensor([adv]), torch.ones(1, 5), entropy_NT=ent_NT,
                            vocab_size=1000)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-adv))
    torch.testing.assert_close(logp_NT.grad, torch.tensor([[-adv / 8, -adv / 8, -adv / 2, -adv / 8, -adv / 8]]))
    scale = 0.02 / math.log(1000)
    torch.testing.assert_close(stats["eps_hi_ent"], torch.tensor(scale * 3.0))
    torch.testing.assert_close(stats["eps_lo_ent"], torch.tensor(scale * 0.25))
    torch.testing.assert_close(stats["entropy_hi_ent"], torch.tensor(3.0))
    torch.testing.assert_close(stats["entropy_lo_ent"], torch.tensor(0.25))
    torch.testing.assert_close(stats["hi_ent_token_frac"], torch.tensor(0.2))
    assert stats["clip_frac"] == 0 and stats["approx_kl"] == 0


def test_adaptive_clip_binds_per_group():
    # |V| = e^2 so eps = 0.01 * mean entropy: hi group (H = 3) eps = 0.03, lo group (H = 0.25) eps = 0.0025
    ent_NT = torch.tensor([[0.1, 0.2, 3.0, 0.3, 0.4]])
    old_NT = torch.zeros(1, 5)
    lr = torch.tensor([[0.01, 0.01, 0.02, 0.01, 0.01]])  # lo group ratio e^0.01 > 1.0025: clipped for A > 0
    logp_NT = _leaf(old_NT + lr)
    loss, stats = espo_loss(logp_NT, old_NT, torch.tensor([1.0]), torch.ones(1, 5), entropy_NT=ent_NT,
                            vocab_size=math.exp(2.0))
    loss.backward()
    s_hi = math.exp(0.02)
    torch.testing.assert_close(loss, torch.tensor(-(s_hi + 1.0025) / 2))
    torch.testing.assert_close(logp_NT.grad, torch.tensor([[0.0, 0.0, -s_hi / 2, 0.0, 0.0]]))
    assert stats["clip_frac_upper_lo_ent"] == 1 and stats["clip_frac_upper_hi_ent"] == 0
    assert stats["clip_frac_lower_lo_ent"] == 0 and stats["clip_frac_lower_hi_ent"] == 0
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.8))
    torch.testing.assert_close(stats["abs_log_ratio_lo_ent"], torch.tensor(0.01))


def _batch(seed, dtype=torch.float32, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    old_NT = -torch.rand(4, 6, generator=g, dtype=dtype)
    logp_NT = old_NT + scale * torch.randn(4, 6, generator=g, dtype=dtype)
    ent_NT = 3 * torch.rand(4, 6, generator=g, dtype=dtype)
    mask_NT = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
                           dtype=torch.bool)
    return old_NT, logp_NT, ent_NT, mask_NT


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 3.0])
def test_one_group_with_fixed_clip_equals_gspo_token(per_token, scale):
    old_NT, logp, ent_NT, mask_NT = _batch(5, scale=scale)
    adv = torch.randn(4, 6) if per_token else torch.randn(4)
    a_lp, b_lp = _leaf(logp), _leaf(logp)
    a, sa = espo_loss(a_lp, old_NT, adv, mask_NT, entropy_NT=ent_NT, rho=1.0, clip_mode="fixed",
                      clip_eps_low=3e-4, clip_eps_high=4e-4)
    b, sb = gspo_loss(b_lp, old_NT, adv, mask_NT, clip_eps_low=3e-4, clip_eps_high=4e-4)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a_lp.grad, b_lp.grad)
    for k in ("clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_max"):
        torch.testing.assert_close(sa[k], sb[k])


@pytest.mark.parametrize("per_token", [False, True])
def test_ratio_modes_agree_on_the_first_minibatch(per_token):
    old_NT, _, ent_NT, mask_NT = _batch(6)
    adv = torch.randn(4, 6) if per_token else torch.randn(4)
    out = {}
    for mode in ("gspo_token", "literal"):
        lp = _leaf(old_NT)
        loss, _ = espo_loss(lp, old_NT, adv, mask_NT, entropy_NT=ent_NT, vocab_size=32000, ratio_mode=mode)
        loss.backward()
        out[mode] = (loss, lp.grad)
    torch.testing.assert_close(out["gspo_token"][0], out["literal"][0])
    torch.testing.assert_close(out["gspo_token"][1], out["literal"][1])


def test_literal_mode_multiplies_in_the_token_ratio_off_policy():
    # K = 1, wide fixed clip: gspo_token gradient = -A s / n, literal = -A s r_t / n
    old_NT = torch.zeros(1, 3)
    lr = torch.tensor([[0.1, -0.2, 0.04]])
    adv = 1.0
    s = math.exp(lr.mean().item())
    grads = {}
    for mode in ("gspo_token", "literal"):
        lp = _leaf(old_NT + lr)
        loss, _ = espo_loss(lp, old_NT, torch.tensor([adv]), torch.ones(1, 3), entropy_NT=torch.ones(1, 3),
                            rho=1.0, ratio_mode=mode, clip_mode="fixed", clip_eps_low=0.5, clip_eps_high=0.5)
        loss.backward()
        grads[mode] = lp.grad
    torch.testing.assert_close(grads["gspo_token"], torch.full((1, 3), -adv * s / 3))
    torch.testing.assert_close(grads["literal"], -adv * s * torch.exp(lr) / 3)
    with pytest.raises(ValueError, match="ratio_mode"):
        espo_loss(old_NT, old_NT, torch.ones(1), torch.ones(1, 3), entropy_NT=torch.ones(1, 3), vocab_size=10,
                  ratio_mode="sequence")


def test_gradcheck_float64_gspo_token():
    old_NT, logp, ent_NT, mask_NT = _batch(7, dtype=torch.float64, scale=1e-3)
    adv_N = torch.tensor([0.5, -1.0, 2.0, -0.3], dtype=torch.float64)
    fn = lambda lp: espo_loss(lp, old_NT, adv_N, mask_NT, entropy_NT=ent_NT, vocab_size=50)[0]
    lp = _leaf(logp)
    _, stats = espo_loss(lp, old_NT, adv_N, mask_NT, entropy_NT=ent_NT, vocab_size=50)
    assert stats["clip_frac"] == 0  # away from the clip, where the surrogate is smooth
    assert torch.autograd.gradcheck(fn, (lp,))


@pytest.mark.parametrize("mode", ["gspo_token", "literal"])
@pytest.mark.parametrize("shift", [1e4, -1e4, 60.0, -60.0])
def test_extreme_ratios_and_inf_padding_stay_finite(mode, shift):
    old_NT, logp, ent_NT, mask_NT = _batch(8)
    logp = logp + shift
    logp[~mask_NT] = float("-inf")
    ent_NT[~mask_NT] = float("nan")
    lp = _leaf(logp)
    loss, stats = espo_loss(lp, old_NT, torch.tensor([1.0, -1.0, 2.0, -2.0]), mask_NT, entropy_NT=ent_NT,
                            vocab_size=151936, ratio_mode=mode)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(lp.grad))
    assert torch.all(lp.grad[~mask_NT] == 0)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(not v.requires_grad for v in stats.values())


def test_empty_responses_do_not_count_and_denom_splits_the_batch():
    old_NT, logp, ent_NT, mask_NT = _batch(9)
    adv_N = torch.randn(4)
    full, _ = espo_loss(logp, old_NT, adv_N, mask_NT, entropy_NT=ent_NT, vocab_size=100)
    pad = lambda x, v: torch.cat([x, torch.full((1, 6), v, dtype=x.dtype)])
    with_empty, _ = espo_loss(pad(logp, 0.0), pad(old_NT, 0.0), torch.cat([adv_N, torch.tensor([9.0])]),
                              pad(mask_NT, False), entropy_NT=pad(ent_NT, 1.0), vocab_size=100)
    torch.testing.assert_close(with_empty, full)
    for agg, count in (("seq_mean_group_mean", 4.0), ("seq_mean_token_mean", 4.0), ("token_mean", mask_NT.sum())):
        whole, _ = espo_loss(logp, old_NT, adv_N, mask_NT, entropy_NT=ent_NT, vocab_size=100, aggregation=agg)
        parts = [espo_loss(logp[s], old_NT[s], adv_N[s], mask_NT[s], entropy_NT=ent_NT[s], vocab_size=100,
                           aggregation=agg, denom=count)[0] for s in (slice(0, 1), slice(1, 4))]
        torch.testing.assert_close(sum(parts), whole)


def test_required_arguments_are_checked():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="entropy_NT"):
        espo_loss(z, z, torch.ones(1), torch.ones(1, 2), vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        espo_loss(z, z, torch.ones(1), torch.ones(1, 2), entropy_NT=z)
    with pytest.raises(ValueError, match="aggregation"):
        espo_loss(z, z, torch.ones(1), torch.ones(1, 2), entropy_NT=z, vocab_size=10, aggregation="sum")
