import pytest
import torch

from engine.algo.loss_seam import loss_class
from engine.algo.losses import GRPO, grpo_loss


def _leaf(x):
    return x.clone().requires_grad_(True)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_minus_adv():
    torch.manual_seed(0)
    old_NT = -torch.rand(3, 5)
    logp_NT = _leaf(old_NT)
    adv_N = torch.tensor([1.0, -2.0, 0.5])
    mask_NT = torch.ones(3, 5, dtype=torch.bool)
    loss, stats = grpo_loss(logp_NT, old_NT, adv_N, mask_NT)
    torch.testing.assert_close(loss, -adv_N.mean())
    loss.backward()
    torch.testing.assert_close(logp_NT.grad, -adv_N[:, None].expand(3, 5) / 15)
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(0.0))
    assert stats["clip_frac"] == 0
    assert all(not v.requires_grad for v in stats.values())


def test_per_token_advantages_equal_broadcast_per_sequence_ones():
    torch.manual_seed(1)
    old_NT, logp_NT = -torch.rand(4, 6), -torch.rand(4, 6)
    adv_N = torch.randn(4)
    mask_NT = torch.rand(4, 6) > 0.3
    a, _ = grpo_loss(logp_NT, old_NT, adv_N, mask_NT)
    b, _ = grpo_loss(logp_NT, old_NT, adv_N[:, None].expand(4, 6), mask_NT)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "log_ratio, adv, has_grad, side",
    [
        (0.5, 1.0, False, "high"),  # r = 1.65 > 1.28, A > 0: clipped, no gradient
        (0.5, -1.0, True, None),  # r > 1 + eps but A < 0: the pessimistic side is unclipped
        (-0.5, -1.0, False, "low"),  # r = 0.61 < 0.8, A < 0: clipped, no gradient
        (-0.5, 1.0, True, None),  # r < 1 - eps but A > 0: unclipped
        (0.2, 1.0, True, None),  # inside [0.8, 1.28]
        (-0.2, -1.0, True, None),  # inside
    ],
)
def test_clipping_removes_gradient_only_on_the_binding_side(log_ratio, adv, has_grad, side):
    old_NT = torch.full((1, 1), -1.0)
    logp_NT = _leaf(old_NT + log_ratio)
    loss, stats = grpo_loss(logp_NT, old_NT, torch.tensor([adv]), torch.ones(1, 1),
                            clip_eps_low=0.2, clip_eps_high=0.28)
    loss.backward()
    assert (logp_NT.grad.abs().item() > 0) == has_grad
    if has_grad:
        ratio = torch.exp(torch.tensor(log_ratio)).item()
        torch.testing.assert_close(logp_NT.grad, torch.tensor([[-adv * ratio]]))
    assert stats["clip_frac_low"].item() == (1.0 if side == "low" else 0.0)
    assert stats["clip_frac_high"].item() == (1.0 if side == "high" else 0.0)
    assert stats["clip_frac"].item() == (0.0 if side is None else 1.0)


def test_asymmetric_clip_range():
    old_NT = torch.zeros(1, 2)
    logp_NT = _leaf(torch.log(torch.tensor([[1.25, 1.3]])))  # 1.25 inside 1 + 0.28, 1.3 beyond it
    loss, stats = grpo_loss(logp_NT, old_NT, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert logp_NT.grad[0, 0] != 0 and logp_NT.grad[0, 1] == 0
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.3))


def test_masked_tokens_have_zero_gradient_and_do_not_count():
    torch.manual_seed(2)
    old_NT = -torch.rand(2, 4)
    logp_NT = _leaf(old_NT + 5.0)  # wild ratios on masked tokens must not leak into stats
    mask_NT = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.float32)
    with torch.no_grad():
        logp_NT[mask_NT.bool()] = old_NT[mask_NT.bool()]
    loss, stats = grpo_loss(logp_NT, old_NT, torch.tensor([1.0, -1.0]), mask_NT)
    loss.backward()
    assert torch.all(logp_NT.grad[mask_NT == 0] == 0)
    assert torch.all(logp_NT.grad[mask_NT == 1] != 0)
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.0))
    assert stats["clip_frac"] == 0


def test_token_mean_vs_seq_mean_token_mean():
    # seq 0: 1 trained token with A=+1; seq 1: 3 trained tokens with A=-1; on policy, per-token loss = -A
    old_NT = torch.zeros(2, 4)
    mask_NT = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv_N = torch.tensor([1.0, -1.0])
    tok, _ = grpo_loss(old_NT.clone(), old_NT, adv_N, mask_NT, aggregation="token_mean")
    seq, _ = grpo_loss(old_NT.clone(), old_NT, adv_N, mask_NT, aggregation="seq_mean_token_mean")
    torch.testing.assert_close(tok, torch.tensor((-1.0 + 3.0) / 4))  # every token weighs 1/4
    torch.testing.assert_close(seq, torch.tensor((-1.0 + 1.0) / 2))  # every sequence weighs 1/2
    # a sequence with no trained tokens does not count in seq_mean
    mask3 = torch.cat([mask_NT, torch.zeros(1, 4, dtype=torch.bool)])
    seq3, _ = grpo_loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([1.0, -1.0, 7.0]), mask3,
                        aggregation="seq_mean_token_mean")
    torch.testing.assert_close(seq3, seq)


def test_registry_and_bad_aggregation():
    assert loss_class("grpo") is GRPO
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), aggregation="sum")
