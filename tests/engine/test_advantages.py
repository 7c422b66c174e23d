import numpy as np
import pytest
import torch

from configs.load import load
from engine.algo.advantages import group_advantages
from engine.coordinator.batch import pack_batch
from tests.engine.test_zero_variance import _group


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


def test_unbiased_std_is_a_choice():
    """learner.adv_std=unbiased (verl's torch.std): divide by n - 1 (issue 19, defect 3)."""
    rewards_NG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv_NG = group_advantages(rewards_NG, eps=0.0, std="unbiased")
    # group 0: mean 0.5, squared deviations 4 * 0.25 = 1, / 3 -> std sqrt(1/3): +-0.5 * sqrt(3)
    a = 0.5 * 3**0.5
    torch.testing.assert_close(adv_NG[0], torch.tensor([a, -a, -a, a]))
    # group 1: mean 2, squared deviations 2, / 3 -> std sqrt(2/3)
    b = (2 / 3) ** -0.5
    torch.testing.assert_close(adv_NG[1], torch.tensor([b, -b, 0.0, 0.0]))
    # the two differ by sqrt(G / (G - 1)) exactly
    torch.testing.assert_close(group_advantages(rewards_NG, eps=0.0), adv_NG * (4 / 3) ** 0.5)
    # invalid members do not count in n: valid (1, 0) -> n = 2, std sqrt(0.5 / 1): +-0.5 / sqrt(0.5)
    valid_NG = torch.tensor([[True, True, False, False]])
    c = 0.5 / 0.5**0.5
    torch.testing.assert_close(group_advantages(rewards_NG[:1], valid_NG, eps=0.0, std="unbiased"),
                               torch.tensor([[c, -c, 0.0, 0.0]]))


def test_unbiased_std_never_divides_by_zero_in_a_group_of_one():
    for std in ("population", "unbiased"):
        one = group_advantages(torch.tensor([[1.0], [0.0]]), eps=0.0, std=std)
        assert torch.equal(one, torch.zeros(2, 1))
        single_valid = group_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), eps=0.0, std=std)
        assert torch.equal(single_valid, torch.zeros(1, 2))


def test_adv_std_reaches_the_batch_and_the_config():
    assert load([]).learner.adv_std == "population"
    assert load(["learner.adv_std=unbiased"]).learner.adv_std == "unbiased"
    with pytest.raises(ValueError, match="learner.adv_std='x' is invalid"):
        load(["learner.adv_std=x"])
    g = _group("g1", [1.0, 0.0, 0.0, 1.0])
    a = 0.5 * 3**0.5
    np.testing.assert_allclose(pack_batch([g], step=1, pad_id=0, adv_std="unbiased").advantages,
                               [a, -a, -a, a], rtol=1e-5)
    np.testing.assert_allclose(pack_batch([g], step=1, pad_id=0).advantages, [1, -1, -1, 1], rtol=1e-5)
