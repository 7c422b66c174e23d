"""Tie-aware judge rewards and advantages (ALGORITHMS.md B.5), and the verdict parser and pair budget."""

import random

import pytest
import torch

from configs.schema import JudgeConfig
from engine.algo.advantages import group_advantages, pairwise_rewards, tie_aware_advantages
from engine.rewards.judge import judge_group, parse_verdict, select_pairs


def _verdicts(quality):
    q = torch.tensor(quality, dtype=torch.float32)
    return torch.sign(q[:, None] - q[None, :])[None], ~torch.eye(len(quality), dtype=torch.bool)[None]


def test_true_ties_get_exactly_zero_or_equal_advantages():
    rewards, valid = pairwise_rewards(*_verdicts([2, 1, 1, 0, 1]))
    adv = tie_aware_advantages(rewards, valid)[0]
    assert adv[1] == 0.0 and adv[2] == 0.0 and adv[4] == 0.0  # tied on balance: exactly zero
    assert adv[0] > 0 > adv[3]
    rewards, valid = pairwise_rewards(*_verdicts([2, 2, 1, 0]))
    adv = tie_aware_advantages(rewards, valid)[0]
    assert adv[0] == adv[1] > 0  # tied with each other: exactly equal
    # the scalar construction gives the on-balance tie a non-zero advantage once the group is unbalanced
    assert group_advantages(torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0, 0.0]]))[0, 1] != 0


def test_all_tie_group_is_zero_variance():
    v = torch.zeros(1, 4, 4)
    rewards, valid = pairwise_rewards(v, ~torch.eye(4, dtype=torch.bool)[None])
    assert valid.all() and torch.equal(tie_aware_advantages(rewards, valid), torch.zeros(1, 4))


def test_unjudged_responses_are_invalid_and_get_zero():
    v, judged = _verdicts([2, 1, 0])
    judged[0, 2, :] = judged[0, :, 2] = False  # response 2: every verdict failed to parse
    rewards, valid = pairwise_rewards(v, judged)
    assert valid.tolist() == [[True, True, False]]
    adv = tie_aware_advantages(rewards, valid)
    assert adv[0, 2] == 0 and adv[0, 0] > 0 > adv[0, 1]


@pytest.mark.parametrize("text,want", [
    (" Better", 1), ("Tie.", 0), (" worse than B", -1), ("<think>A is better... or worse</think>Verdict: Tie", 0),
    ("reasoning...\nVerdict: **Worse**", -1), ("", None), ("12+3=", None), (" Better or Worse", None),
    ("maybe", None),
])
def test_verdict_parser(text, want):
    assert parse_verdict(text) == want


def test_pair_selection_respects_the_budget():
    rng = random.Random(0)
    assert len(select_pairs(8, JudgeConfig(max_calls_per_group=0), rng)) == 28
    assert len(select_pairs(8, JudgeConfig(max_calls_per_group=10), rng)) == 10
    both = select_pairs(8, JudgeConfig(max_calls_per_group=10, both_orders=True), rng)
    assert len(both) == 10 and {(b, a) for a, b in both} == set(both)
    assert select_pairs(3, JudgeConfig(construction="anchor"), rng) == [(0, -1), (1, -1), (2, -1)]
    assert select_pairs(3, JudgeConfig(construction="anchor", anchor="first"), rng) == [(1, 0), (2, 0)]


class _Oracle:
    """A judge backend that reads each response's quality from its text ("q=2") and answers in words."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, *, max_new_tokens, temperature):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            a = int(p.split("Response A: q=")[1][0])
            b = int(p.split("Response B: q=")[1][0])
            out.append({1: " Better", 0: " Tie", -1: " Worse"}[(a > b) - (a < b)] if a != 9 else "garbage")
        return out


def test_judge_group_constructions_through_the_prompt_and_parser():
    oracle = _Oracle()
    res = judge_group(oracle, JudgeConfig(max_calls_per_group=0), question="Q", reference="q=1",
                      responses=["q=2", "q=1", "q=1", "q=0"])
    assert oracle.calls == 6 and res.parts["judge_calls"] == 6 and res.parts["judge_parse_failures"] == 0
    assert res.rewards[1] == res.rewards[2] == 0.0 and res.rewards[0] == 1.0 and res.rewards[3] == -1.0
    res = judge_group(oracle, JudgeConfig(construction="anchor"), question="Q", reference="q=1",
                      responses=["q=2", "q=1", "q=0", "q=9"])
    assert res.rewards[:3] == [1.0, 0.0, -1.0] and res.valid == [True, True, True, False]
    assert res.parts["judge_parse_failures"] == 1
    res = judge_group(oracle, JudgeConfig(both_orders=True, max_calls_per_group=0), question="Q", reference="",
                      responses=["q=1", "q=1", "q=1"])
    assert res.rewards == [0.0, 0.0, 0.0] and res.parts["judge_ties"] == 6  # all Tie: a zero-variance group


def test_coordinator_judging_applies_margins_once_and_ignores_old_answers():
    import asyncio

    import numpy as np

    from engine.coordinator.buffer import Group
    from engine.rewards.judge import JUDGE_PART
    from engine.coordinator.judging import Judging
    from transport import Judged

    g = Group(group_id="g1", prompt_id=1, prompt_ids=np.arange(3, dtype=np.int32), answer="5", num_samples=2)
    for s in g.ordered():
        s.append(np.array([4, 2], np.int32), np.zeros(2, np.float32), np.zeros(2, np.int32), None)
        s.finish_reason, s.reward, s.valid, s.reward_parts = "stop", 1.0, True, {"correct": 1.0}
    judging = Judging(hub=None, rewards=[])  # no reward worker alive: the request waits for one
    assert judging.needs(g)
    asyncio.run(judging.request(g))
    asyncio.run(judging.request(g))  # asked again (e.g. regenerated): only the newest answer counts
    old = Judged(group_id="g1", sample_indices=[0, 1], rewards=[1.0, -1.0], valid=[True, True], request_id=1)
    assert not judging.apply(g, old) and g.samples[0].reward == 1.0
    new = Judged(group_id="g1", sample_indices=[0, 1], rewards=[0.0, 0.0], valid=[True, False],
                 parts={"judge_ties": 1.0}, request_id=2)
    assert judging.apply(g, new) and not judging.needs(g)
    assert [s.reward for s in g.ordered()] == [0.0, 0.0] and [s.valid for s in g.ordered()] == [True, False]
    assert g.samples[0].reward_parts == {"correct": 1.0, "judge_ties": 1.0, JUDGE_PART: 0.0}
    assert not judging.apply(g, new)  # answered once


def _matrix(upper):
    """Antisymmetric verdicts from {(i, j): v(i, j)} for i < j; every pair of the group judged."""
    g = 1 + max(j for _, j in upper)
    v = torch.zeros(1, g, g)
    for (i, j), x in upper.items():
        v[0, i, j], v[0, j, i] = x, -x
    return v, ~torch.eye(g, dtype=torch.bool)[None]


def test_dead_zone_hand_computed():
    # all-tie group of 4 with one judge error, (0, 1) called Better: net verdicts m = [1, -1, 0, 0]
    v, j = _matrix({(0, 1): 1, (0, 2): 0, (0, 3): 0, (1, 2): 0, (1, 3): 0, (2, 3): 0})
    rewards, valid = pairwise_rewards(v, j)
    assert torch.allclose(rewards, torch.tensor([[1 / 3, -1 / 3, 0.0, 0.0]]))  # no margin: a tie gets a push
    assert tie_aware_advantages(rewards, valid)[0, 0] > 0
    rewards, valid = pairwise_rewards(v, j, tie_margin=1)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 0.0]] and valid.all()  # |m| <= 1: tied, zero-variance
    assert torch.equal(tie_aware_advantages(rewards, valid), torch.zeros(1, 4))
    # qualities [2, 1, 1, 0] with (1, 3) wrongly called Tie: m = [3, 0, 0, -3] -> [3, -1, 0, -2]
    v, j = _matrix({(0, 1): 1, (0, 2): 1, (0, 3): 1, (1, 2): 0, (1, 3): 0, (2, 3): 1})
    rewards, _ = pairwise_rewards(v, j, tie_margin=1)
    assert torch.equal(rewards, torch.tensor([[1.0, 0.0, 0.0, -2 / 3]]))  # 1, 2 tied; 0, 3 keep m / (G - 1)
    rewards, _ = pairwise_rewards(v, j, tie_margin=2)
    assert rewards.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_dead_zone_counts_net_verdicts_under_a_budget_and_both_orders():
    v, j = _matrix({(0, 1): 0.5, (0, 2): 1, (1, 2): 0})  # (0, 1): the two orders disagree (Better, Tie)
    j[0, 1, 2] = j[0, 2, 1] = False  # (1, 2) not judged
    rewards, valid = pairwise_rewards(v, j, tie_margin=1)
    assert valid.all() and torch.allclose(rewards, torch.tensor([[0.75, 0.0, 0.0]]))  # m = [1.5, -0.5, -1]


def test_dead_zone_never_zeroes_a_response_beyond_it():
    gen = torch.Generator().manual_seed(0)
    for margin in (0.5, 1.0, 2.0, 3.0):
        for _ in range(50):
            g = int(torch.randint(2, 10, (1,), generator=gen))
            up = torch.randint(-1, 2, (4, g, g), generator=gen).float().triu(1)
            v = up - up.transpose(1, 2)
            judged = torch.rand(4, g, g, generator=gen) < 0.8
            judged = (judged.triu(1) | judged.triu(1).transpose(1, 2))
            plain, valid = pairwise_rewards(v, judged)
            robust, valid2 = pairwise_rewards(v, judged, tie_margin=margin)
            m = torch.where(judged, v, 0.0).sum(-1)
            beyond = m.abs() > margin
            assert torch.equal(valid, valid2)
            assert torch.equal(robust[beyond], plain[beyond])  # unchanged, sign and size
            assert (robust[~beyond] == 0).all()


def test_group_tie_test():
    # 8 responses, all tied but one judge error: 1 of 28 pairs non-Tie (3.6%)
    upper = {(i, k): 0 for i in range(8) for k in range(i + 1, 8)}
    v, j = _matrix({**upper, (2, 5): -1})
    assert pairwise_rewards(v, j)[0].abs().sum() > 0
    assert pairwise_rewards(v, j, group_tie_frac=0.1)[0].tolist() == [[0.0] * 8]
    assert pairwise_rewards(v, j, group_tie_frac=0.03)[0].abs().sum() > 0  # 1/28 > 0.03: not all-tie
    # the least mixed group (one response better than the other 7): 7 of 28 non-Tie, kept
    v, j = _matrix({**upper, **{(0, k): 1 for k in range(1, 8)}})
    rewards, _ = pairwise_rewards(v, j, tie_margin=1, group_tie_frac=0.1)
    assert rewards[0, 0] == 1.0 and (rewards[0, 1:] == 0).all()  # each loser: m = -1, within the margin


def test_both_orders_agreement_and_judge_group_defaults():
    from engine.rewards.judge import merge_orders

    assert merge_orders([1, 1], "agree") == 1.0 and merge_orders([1, 0], "agree") == 0.0
    assert merge_orders([-1], "agree") == 0.0 and merge_orders([1, 0], "mean") == 0.5
    with pytest.raises(ValueError, match="both_orders"):
        JudgeConfig(order_rule="agree")
    # defaults: tie_margin=1; a net margin of +-1 is within the dead zone (a real small difference is lost)
    res = judge_group(_Oracle(), JudgeConfig(), question="Q", reference="", responses=["q=1", "q=1", "q=0"])
    assert res.rewards == [0.0, 0.0, -1.0]  # m = [1, 1, -2]
    res = judge_group(_Oracle(), JudgeConfig(), question="Q", reference="", responses=["q=1", "q=0", "q=0"])
    assert res.rewards == [1.0, 0.0, 0.0]  # m = [2, -1, -1]
    res = judge_group(_Oracle(), JudgeConfig(tie_margin=0), question="Q", reference="",
                      responses=["q=1", "q=0", "q=0"])
    assert res.rewards == [1.0, -0.5, -0.5]
    # anchor margins are single verdicts: the dead zone does not apply
    res = judge_group(_Oracle(), JudgeConfig(construction="anchor"), question="Q", reference="q=1",
                      responses=["q=2", "q=0"])
    assert res.rewards == [1.0, -1.0]


def test_judge_config_validation_names_the_key():
    from configs.schema import JudgeConfig, RewardConfig, RunConfig

    for kw, key in [({"tie_margin": -1}, "reward.judge.tie_margin"),
                    ({"group_tie_frac": 1.0}, "reward.judge.group_tie_frac"),
                    ({"order_rule": "vote"}, "reward.judge.order_rule"),
                    ({"order_rule": "agree"}, "both_orders=true")]:
        with pytest.raises(ValueError, match=key):
            JudgeConfig(**kw)
    JudgeConfig(order_rule="agree", both_orders=True)
    from configs.schema import RolloutConfig

    with pytest.raises(ValueError, match="reward.judge.group_tie_frac=0.0312"):
        RunConfig(reward=RewardConfig(plugin="judge"), rollout=RolloutConfig(group_size=32, max_group_size=32))
    RunConfig(reward=RewardConfig(plugin="judge", judge=JudgeConfig(group_tie_frac=0.03)),
              rollout=RolloutConfig(group_size=32, max_group_size=32))
