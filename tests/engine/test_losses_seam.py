"""The loss seam: shared aggregation (Dr.GRPO's constant normaliser), the Dr.GRPO loss, the LossInputs record and
its advantage transforms, and ESPO's batch-global hook. Expected values are computed by hand."""

import math

import pytest
import torch

from engine.algo.aggregation import aggregate
from engine.algo.espo import espo_loss
from engine.algo.loss_registry import DrGRPOConfig, ESPOConfig, GRPOConfig
from engine.algo.loss_seam import LossInputs, build_loss
from engine.algo.transforms import decoupled_weights, rl_zvp

pytestmark = pytest.mark.timeout(30)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_seq_mean_token_sum_norm_divides_each_sum_by_the_constant():
    loss_NT = torch.tensor([[1.0, 2.0, 3.0, 7.0], [4.0, 7.0, 7.0, 7.0], [9.0, 9.0, 9.0, 9.0]])
    mask_NT = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # sums 6 and 4, each / 4; the third sequence has no trained token and does not count
    got = aggregate(loss_NT, mask_NT, "seq_mean_token_sum_norm", norm_len=4)
    torch.testing.assert_close(got, torch.tensor((6 / 4 + 4 / 4) / 2))
    torch.testing.assert_close(aggregate(loss_NT, mask_NT, "seq_mean_token_mean"), torch.tensor((2.0 + 4.0) / 2))
    torch.testing.assert_close(aggregate(loss_NT, mask_NT, "token_mean"), torch.tensor(10.0 / 4))
    # a shard: denom = the whole batch's sequences
    torch.testing.assert_close(aggregate(loss_NT, mask_NT, "seq_mean_token_sum_norm", 5.0, norm_len=4),
                               torch.tensor((1.5 + 1.0) / 5))
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(loss_NT, mask_NT, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="only espo"):
        aggregate(loss_NT, mask_NT, "seq_mean_group_mean")


def test_dr_grpo_value_and_gradient_by_hand():
    # on policy, per-token loss = -A; responses of 1 and 3 tokens, generation limit 4
    old_NT = -torch.rand(2, 4)
    mask_NT = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv_N = torch.tensor([1.0, -2.0])
    dr = build_loss("dr_grpo", DrGRPOConfig(), vocab_size=10, norm_len=4)
    assert dr.aggregation == "seq_mean_token_sum_norm"
    lp = _leaf(old_NT)
    loss, stats = dr(LossInputs(lp, old_NT, adv_N, mask_NT))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-1.0 / 4 + 6.0 / 4) / 2))  # GRPO's token_mean would be 5/4
    # every token weighs 1 / (norm_len * sequences) = 1/8, whatever its response's length
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 8, 0, 0, 0], [2 / 8, 2 / 8, 2 / 8, 0]]))
    assert stats["clip_frac"] == 0
    grpo = build_loss("grpo", GRPOConfig(), vocab_size=10, norm_len=4)
    torch.testing.assert_close(grpo(LossInputs(old_NT, old_NT, adv_N, mask_NT))[0], torch.tensor(5.0 / 4))


def test_dr_grpo_clip_binds_like_grpo():
    old_NT = torch.zeros(1, 2)
    lp = _leaf(torch.tensor([[0.5, 0.1]]))  # r = 1.6487 (clipped at 1.28 for A > 0) and 1.1052
    dr = build_loss("dr_grpo", DrGRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28), vocab_size=10, norm_len=8)
    loss, stats = dr(LossInputs(lp, old_NT, torch.tensor([1.0]), torch.ones(1, 2)))
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-(1.28 + math.exp(0.1)) / 8))
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -math.exp(0.1) / 8]]))
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.5))


def test_decoupled_weights_retarget_the_ratio_and_weight_the_advantage():
    behav_NT = torch.zeros(1, 3)
    prox_NT = torch.log(torch.tensor([[1.5, 3.0, 0.5]]))
    mask_NT = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    x = LossInputs(torch.zeros(1, 3), behav_NT, torch.tensor([2.0]), mask_NT)
    y, sums = decoupled_weights(x, prox_NT, cap=2.0)
    assert x.old_logp_NT is behav_NT and x.weight_NT is None  # the record is frozen: a new one comes back
    assert y.old_logp_NT is prox_NT
    torch.testing.assert_close(y.token_advantages(), torch.tensor([[2.0 * 1.5, 2.0 * 2.0, 0.0]]))
    total, weight = sums["is_weight_mean"]
    torch.testing.assert_close(total / weight, torch.tensor(3.5 / 2, dtype=torch.float64))
    total, weight = sums["is_truncated_frac"]
    assert float(total) == 1 and float(weight) == 2


def test_rl_zvp_then_decoupled_compose():
    ent_NT = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 9.0], [1.0, 1.0, 1.0]])
    mask_NT = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    x = LossInputs(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([0.0, 0.0, 0.7]), mask_NT, entropy_NT=ent_NT)
    y, sums = rl_zvp(x, torch.tensor([1, -1, 0]), alpha=0.5)
    expected = torch.tensor([[0.5, 1.0, 0.0],  # all-correct: +alpha * H
                             [-0.5 * 8.5, -0.5 * 9.0, 0.0],  # all-wrong: -alpha * (max H - H)
                             [0.7, 0.7, 0.7]])  # informative: its own advantage
    torch.testing.assert_close(y.adv, expected)
    total, weight = sums["rl_zvp_token_frac"]
    assert float(total) == 5 and float(weight) == 8
    z, _ = decoupled_weights(y, torch.full((3, 3), math.log(1.5)), cap=2.0)
    torch.testing.assert_close(z.token_advantages(), expected * 1.5 * mask_NT)
    with pytest.raises(ValueError, match="entropy_NT"):
        rl_zvp(LossInputs(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1)),
               torch.ones(1), alpha=0.1)


def test_espo_batch_hook_gives_shards_the_whole_batch_threshold():
    ent_NT = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [5.0, 6.0, 7.0, 8.0, 9.0]])
    mask_NT = torch.ones(2, 5, dtype=torch.bool)
    assert build_loss("espo", ESPOConfig(), vocab_size=50, norm_len=8).batch_fields == ()
    espo = build_loss("espo", ESPOConfig(entropy_scope="batch"), vocab_size=50, norm_len=8)
    assert espo.batch_fields == ("entropy_NT",)
    batch = espo.batch_statistics({"entropy_NT": ent_NT[mask_NT]})
    torch.testing.assert_close(batch["entropy_threshold"], torch.tensor(8.0))  # 10 tokens -> the top 2
    torch.manual_seed(0)
    old_NT = -torch.rand(2, 5)
    logp_NT = old_NT + 1e-3 * torch.randn(2, 5)
    adv_N = torch.tensor([1.0, -0.5])
    whole, _ = espo_loss(logp_NT, old_NT, adv_N, mask_NT, entropy_NT=ent_NT, vocab_size=50,
                         entropy_quantile_scope="batch")
    parts = [espo(LossInputs(logp_NT[s], old_NT[s], adv_N[s], mask_NT[s], entropy_NT=ent_NT[s], denom=2.0), batch)
             for s in (slice(0, 1), slice(1, 2))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)
    assert parts[0][1]["hi_ent_token_frac"] == 0  # the low-entropy response has no token above the batch threshold
    alone, _ = espo(LossInputs(logp_NT[:1], old_NT[:1], adv_N[:1], mask_NT[:1], entropy_NT=ent_NT[:1], denom=2.0))
    assert not torch.allclose(alone, parts[0][0])  # its own threshold would give it a high group
