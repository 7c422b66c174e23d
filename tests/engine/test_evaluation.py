"""engine/evaluation.py: the scores the run's periodic eval and everyprompt-eval share (pass@k, greedy accuracy)."""

import asyncio
from math import comb

import numpy as np
import pytest

from engine.coordinator.buffer import Group
from engine.coordinator.evals import Evaluations
from engine.evaluation import correctness, pass_at_k, score_eval

pytestmark = pytest.mark.timeout(30)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = the fraction correct
    for n, c, k in ((10, 3, 2), (20, 5, 7), (200, 13, 100)):
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError, match="at least k"):
        pass_at_k(2, 1, 3)


def test_score_eval_gives_accuracy_and_pass_at_k():
    out = score_eval([1.0, 0.0, 0.5], [[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]], k=1)  # partial credit does not pass
    assert out == {"accuracy": 0.5, "num_prompts": 3, "pass_at_k": pytest.approx(1 / 3), "k": 1, "num_samples": 2}
    assert score_eval([1.0, 0.0]) == {"accuracy": 0.5, "num_prompts": 2}
    with pytest.raises(ValueError, match="each of the 2 prompts"):
        score_eval([1.0, 0.0], [[1.0]], k=1)
    with pytest.raises(ValueError, match="empty"):
        score_eval([])


def test_correctness_is_the_raw_verdict_not_the_shaped_reward():
    assert correctness(0.8, {"correct": 1.0, "overlong": -0.2}) == 1.0
    assert correctness(0.0, {"plugin_timeout": 1.0}) == 0.0  # a response the verifier could not judge


def test_the_runs_periodic_eval_scores_its_groups_with_score_eval():
    evals = Evaluations()
    verdicts = [(1.0, {"correct": 1.0}), (0.7, {"correct": 1.0, "overlong": -0.3}), (0.0, {"plugin_error": 1.0}),
                (0.0, {"correct": 0.0})]

    async def submit(group_id: str, item) -> None:  # a worker answering at once, as the reward worker records it
        g = Group(group_id=group_id, prompt_id=item, prompt_ids=np.zeros(1, np.int32), answer="7", num_samples=1,
                  temperature=0.0)
        g.samples[0].reward, g.samples[0].reward_parts = verdicts[item]
        asyncio.get_running_loop().call_soon(evals.resolve, g)

    async def go():
        return await evals.run(list(range(len(verdicts))), tag="v0", submit=submit)

    out = asyncio.run(go())
    assert out["accuracy"] == 0.5 and out["num_prompts"] == 4 and out["eval_s"] >= 0
    assert {k: v for k, v in out.items() if k != "eval_s"} == score_eval([1.0, 1.0, 0.0, 0.0])
