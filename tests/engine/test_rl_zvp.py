import pytest
import torch

from engine.algo.advantages import group_advantages, rl_zvp_advantages

pytestmark = pytest.mark.timeout(30)

ENT_GT = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 9.0]])
MASK_GT = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def _expand(x, n):
    return x[None].expand(n, *x.shape).clone()


def test_all_correct_all_wrong_and_mixed_groups():
    rewards_NG = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    adv_NGT = rl_zvp_advantages(rewards_NG, None, _expand(ENT_GT, 3), _expand(MASK_GT, 3), alpha=0.5, eps=0.0)
    # all-correct: +alpha * H (token 2 of response 0 is padding -> 0)
    torch.testing.assert_close(adv_NGT[0], torch.tensor([[0.5, 1.0, 0.0], [0.25, 0.0, 4.5]]))
    # all-wrong: -alpha * (max over the response's own trained tokens - H); response 0's max is 2, not 3
    torch.testing.assert_close(adv_NGT[1], torch.tensor([[-0.5, 0.0, 0.0], [-4.25, -4.5, 0.0]]))
    # variance: the Eq. 11 advantage (+-1 here) broadcast over trained tokens
    torch.testing.assert_close(adv_NGT[2], torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]))


def test_switch_off_gives_broadcast_group_advantages():
    torch.manual_seed(0)
    rewards_NG = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [0.0, 0.0, 0.0]])
    ent_NGT, mask_NGT = torch.rand(3, 3, 4), torch.rand(3, 3, 4) > 0.3
    off = rl_zvp_advantages(rewards_NG, None, ent_NGT, mask_NGT, shape_zero_variance=False)
    ref = group_advantages(rewards_NG)[..., None] * mask_NGT
    torch.testing.assert_close(off, ref)
    assert torch.all(off[0] == 0) and torch.all(off[2] == 0)
    on = rl_zvp_advantages(rewards_NG, None, ent_NGT, mask_NGT)
    torch.testing.assert_close(on[1], off[1])  # non-zero-variance groups are untouched
    assert torch.all(on[0][mask_NGT[0]] >= 0) and torch.all(on[2][mask_NGT[2]] <= 0)


def test_invalid_members_get_zero_and_only_valid_rewards_decide_zero_variance():
    rewards_NG = torch.tensor([[1.0, float("nan")], [1.0, 0.0]])
    valid_NG = torch.tensor([[True, False], [True, False]])
    adv_NGT = rl_zvp_advantages(rewards_NG, valid_NG, _expand(ENT_GT, 2), _expand(MASK_GT, 2), alpha=1.0)
    torch.testing.assert_close(adv_NGT[:, 0], torch.tensor([[1.0, 2.0, 0.0]] * 2))  # one valid, correct member
    assert torch.all(adv_NGT[:, 1] == 0)
    none_valid = rl_zvp_advantages(rewards_NG, torch.zeros(2, 2, dtype=torch.bool), _expand(ENT_GT, 2),
                                   _expand(MASK_GT, 2))
    assert torch.all(none_valid == 0)


def test_alpha_scales_linearly_and_threshold_decides_correctness():
    rewards_NG = torch.tensor([[-1.0, -1.0], [0.7, 0.7]])
    ent, mask = _expand(ENT_GT, 2), _expand(MASK_GT, 2)
    a1 = rl_zvp_advantages(rewards_NG, None, ent, mask, alpha=0.1)
    a3 = rl_zvp_advantages(rewards_NG, None, ent, mask, alpha=0.3)
    torch.testing.assert_close(a3, 3 * a1)
    assert torch.all(a1[0] <= 0) and torch.all(a1[1] >= 0)  # -1 all-wrong; 0.7 >= 0.5 all-correct
    a_hi = rl_zvp_advantages(rewards_NG, None, ent, mask, alpha=0.1, success_threshold=0.8)
    assert torch.all(a_hi[1] <= 0)
