import torch

from engine.algo.advantages import group_advantages


def test_known_group_uses_population_std():
    rewards_NG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv_NG = group_advantages(rewards_NG, eps=0.0)
    # group 0: mean 0.5, population std 0.5 -> +-1
    torch.testing.assert_close(adv_NG[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    # group 1: mean 2, population std sqrt(0.5)
    s = 0.5**0.5
    torch.testing.assert_close(adv_NG[1], torch.tensor([1 / s, -1 / s, 0.0, 0.0]))


def test_eps_is_added_to_std():
    adv_NG = group_advantages(torch.tensor([[1.0, 0.0]]), eps=0.5)
    torch.testing.assert_close(adv_NG, torch.tensor([[0.5, -0.5]]))  # (1 - 0.5) / (0.5 + 0.5)


def test_invalid_members_are_excluded_and_get_zero():
    rewards_NG = torch.tensor([[1.0, 0.0, float("nan"), 100.0]])
    valid_NG = torch.tensor([[True, True, False, False]])
    adv_NG = group_advantages(rewards_NG, valid_NG, eps=0.0)
    torch.testing.assert_close(adv_NG, torch.tensor([[1.0, -1.0, 0.0, 0.0]]))


def test_zero_variance_and_single_valid_groups_give_zero():
    rewards_NG = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [5.0, 0.0, 2.0]])
    valid_NG = torch.tensor([[True, True, True], [True, True, True], [True, False, False]])
    adv_NG = group_advantages(rewards_NG, valid_NG)
    assert torch.equal(adv_NG, torch.zeros(3, 3))


def test_zero_variance_among_valid_members_only():
    rewards_NG = torch.tensor([[1.0, 1.0, 0.0]])
    valid_NG = torch.tensor([[True, True, False]])
    assert torch.equal(group_advantages(rewards_NG, valid_NG), torch.zeros(1, 3))


def test_valid_advantages_have_zero_mean_and_unit_std():
    torch.manual_seed(0)
    rewards_NG = torch.randn(16, 8, dtype=torch.float64)
    adv_NG = group_advantages(rewards_NG, eps=0.0)
    torch.testing.assert_close(adv_NG.mean(-1), torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(adv_NG.std(-1, correction=0), torch.ones(16, dtype=torch.float64))


def test_dr_grpo_advantage_is_not_divided_by_the_std():
    rewards_NG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    adv_NG = group_advantages(rewards_NG, scale_by_std=False)
    torch.testing.assert_close(adv_NG, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0], [0.0] * 4]))
    valid_NG = torch.tensor([[True, True, False, True]] * 3)  # invalid members neither count nor get anything
    torch.testing.assert_close(group_advantages(rewards_NG, valid_NG, scale_by_std=False)[1],
                               torch.tensor([1.0, -1.0, 0.0, 0.0]))
