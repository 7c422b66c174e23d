"""The built-in reasoning tasks: long-tailed worked solutions, and verifiers that judge the final answer only."""

import random

import numpy as np
import pytest

from configs.load import load
from configs.schema import TaskConfig
from engine.data.reasoning import GENERATORS, add_steps, countdown_search, selection_passes
from engine.data.reasoning_check import check_countdown, evaluate, final_answer
from engine.data.tasks import CharTokenizer, build_task, generation_limit
from engine.rewards.plugins import resolve

NAMES = ("scratchpad", "countdown", "sorting")


def _lengths(task, n: int = 3000) -> np.ndarray:
    tok = task.tokenizer
    return np.array([len(tok.encode(ex.answer)) + 1 for ex in task.sample_train(random.Random(0), n)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_worked_solutions_are_long_tailed(name):
    task = build_task(TaskConfig(name=name, num_eval=100, num_dev=50))
    lengths = _lengths(task)
    median, p99 = float(np.median(lengths)), float(np.percentile(lengths, 99))
    print(f"{name}: worked-solution tokens (with eos) min {lengths.min()} median {median:g} p90 "
          f"{np.percentile(lengths, 90):g} p99 {p99:g} max {lengths.max()}; p99/median {p99 / median:.1f}; "
          f"generation limit {task.max_answer_tokens}")
    assert lengths.min() <= 12 and p99 >= 200
    assert p99 >= 8 * median
    assert lengths.max() <= task.max_answer_tokens == generation_limit(TaskConfig(name=name))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_the_verifier_accepts_every_worked_solution(name):
    task = build_task(TaskConfig(name=name, num_eval=200, num_dev=50))
    plugin = resolve(load([f"task.name={name}"]).reward.plugin)
    examples = task.eval_set + task.dev_set + task.sample_train(random.Random(1), 1000)
    assert {ex.difficulty for ex in examples} == set(range(1, 7))
    held = {ex.prompt for ex in task.eval_set + task.dev_set}
    assert len(held) == 250 and not held & {ex.prompt for ex in examples[250:]}
    for ex in examples:
        CharTokenizer().encode(ex.prompt + ex.answer)  # every character is in the built-in vocabulary
        assert task.score(ex.answer, ex.answer) == (1.0, True)
        assert plugin(ex.answer, ex.answer, {}).score == 1.0
        # only the final answer is judged: the worked steps can be dropped
        assert task.score(ex.answer.splitlines()[-1], ex.answer) == (1.0, True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ("scratchpad", "sorting"))
def test_a_wrong_final_answer_is_rejected(name):
    task = build_task(TaskConfig(name=name, num_eval=50, num_dev=10))
    for ex in task.eval_set:
        steps, last = ex.answer.rsplit("\n", 1) if "\n" in ex.answer else ("", ex.answer)
        wrong = last[:-1] + str((int(last[-1]) + 1) % 10)
        assert task.score(f"{steps}\n{wrong}", ex.answer) == (0.0, True)
        assert task.score(steps, ex.answer) == (0.0, True)  # no final-answer line at all
        assert task.score(f"{ex.answer}\n{wrong}", ex.answer) == (0.0, True)  # the last final line counts
    assert task.score("#1", "no final line") == (0.0, False)


@pytest.mark.timeout(30)
def test_countdown_rejects_wrong_unsafe_and_reused_numbers():
    ref = "3 5 8 2>16\n8*2=16\n#8*2"
    for response in ("#8*2", "#(3+5)*2", "#2*8", "5+3=8|8 8 2\n8*2=16\n#(5+3)*2", "# ( 3 + 5 ) * 2 ", "#8*(5-3)"):
        assert check_countdown(response, ref) == (1.0, True), response
    bad = ["#8+8", "#(3+5)+(5+3)", "#8*3", "#__import__('os').system('true')", "#(lambda: 16)()", "#16", "#2**4",
           "#8*2.0", "#-2*-8", "#8*2 if 1 else 0", "#[8*2][0]", "#8*2;1", "#" + "(" * 300 + "16" + ")" * 300,
           "#8/(5-5)", "#True*16", "", "8*2", "#8*2\n#8*3"]
    for response in bad:
        assert check_countdown(response, ref) == (0.0, True), response
    assert check_countdown("#8*2", "no header") == (0.0, False)
    with pytest.raises(ValueError, match="Call is not allowed"):
        evaluate("__import__('os')")
    assert evaluate("(8-2)/4+5")[1] == [8, 2, 4, 5]


@pytest.mark.timeout(30)
def test_countdown_corrupted_worked_solutions_fail():
    task = build_task(TaskConfig(name="countdown", num_eval=200, num_dev=10))
    for ex in task.eval_set:
        first = ex.answer.split("\n", 1)[0].split()[0]
        expr = final_answer(ex.answer)
        steps = ex.answer.rsplit("\n", 1)[0]
        assert check_countdown(f"{steps}\n#({expr})+{first}", ex.answer) == (0.0, True)  # reused or off target
        assert check_countdown(f"{steps}\n#({expr})-1", ex.answer) == (0.0, True)
        assert check_countdown(f"{steps}\n#{expr}", ex.answer) == (1.0, True)


@pytest.mark.timeout(10)
def test_step_formats():
    assert add_steps(485, 37) == "485+37: 5+7+0=12 8+3+1=12 4+0+1=05 =522"
    assert selection_passes([5, 3, 9, 1]) == ["1|3 9 5", "1 3|9 5", "1 3 5|9"]
    lines, expr = countdown_search([3, 5, 8, 2], 16)
    assert lines == ["8*2=16"] and expr == "8*2"
    rng = random.Random(0)
    assert [GENERATORS["scratchpad"](rng, 1).answer.count("\n") for _ in range(5)] == [0] * 5  # level 1: direct


@pytest.mark.timeout(30)
def test_config_selects_the_task_and_its_verifier():
    cfg = load(["task.name=countdown", "task.min_level=2", "task.max_level=3"], config_name="tiny")
    assert cfg.reward.plugin == "engine.rewards.reasoning_verifiers:countdown"
    assert load(["task.name=sorting", "reward.plugin=math"]).reward.plugin == "math"  # an explicit choice stays
    task = build_task(cfg.task)
    assert {ex.difficulty for ex in task.eval_set} == {2, 3}
    with pytest.raises(Exception, match="task.min_level"):
        load(["task.name=sorting", "task.max_level=7"])
    with pytest.raises(Exception, match="choose arithmetic, jsonl, scratchpad, countdown or sorting"):
        load(["task.name=sudoku"])
    with pytest.raises(Exception, match="too few distinct prompts"):
        build_task(TaskConfig(name="countdown", min_level=1, max_level=1, num_eval=500, num_dev=200))
