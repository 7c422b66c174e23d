import json
import random

import pytest

from configs.schema import TaskConfig
from engine.data.tasks import CharTokenizer, build_task


@pytest.mark.timeout(10)
def test_tokenizer_round_trip_stops_at_eos_and_skips_pad():
    tok = CharTokenizer()
    ids = tok.encode("37+485= 1")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, 5, 6]) == "37+485= 1"
    assert tok.decode([tok.pad_id, *tok.encode("12"), tok.pad_id]) == "12"
    assert tok.vocab_size < 128 and len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tok.encode("caf\u00e9")


@pytest.mark.timeout(10)
def test_arithmetic_sets_are_fixed_disjoint_and_correct():
    cfg = TaskConfig(num_eval=300, num_dev=100)
    task, again = build_task(cfg), build_task(cfg)
    assert task.eval_set == again.eval_set and task.dev_set == again.dev_set
    assert len(task.eval_set) == 300 and len(task.dev_set) == 100
    held = {ex.prompt for ex in task.eval_set + task.dev_set}
    assert len(held) == 400
    train = task.sample_train(random.Random(0), 2000)
    assert not held & {ex.prompt for ex in train}
    assert {ex.difficulty for ex in train} == {1, 2, 3, 4}
    for ex in task.eval_set[:50] + train[:50]:
        a, b = ex.prompt.rstrip("=").split("+")
        assert ex.answer == str(int(a) + int(b))[::-1]  # reversed digits by default


@pytest.mark.timeout(10)
def test_arithmetic_normal_order_and_score():
    task = build_task(TaskConfig(reverse_answer=False, num_eval=20, num_dev=10))
    ex = task.eval_set[0]
    a, b = ex.prompt.rstrip("=").split("+")
    assert ex.answer == str(int(a) + int(b))
    assert task.score(f" {ex.answer} ", ex.answer) == (1.0, True)
    assert task.score(ex.answer + "0", ex.answer) == (0.0, True)
    assert task.score("", "") == (0.0, False)


@pytest.mark.timeout(10)
def test_sft_ids_mask_only_answer_and_eos():
    task = build_task(TaskConfig(num_eval=5, num_dev=5))
    ex = task.eval_set[0]
    ids, mask = task.sft_ids(ex)
    prompt = task.prompt_ids(ex)
    assert ids[: len(prompt)] == prompt and ids[-1] == task.tokenizer.eos_id
    assert mask == [0] * len(prompt) + [1] * (len(ex.answer) + 1)
    assert task.tokenizer.decode(ids[len(prompt):]) == ex.answer


@pytest.mark.timeout(10)
def test_jsonl_splits_deterministically(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}?", "answer": i}) + "\n" for i in range(30)))
    cfg = TaskConfig(name="jsonl", jsonl_path=str(path), num_eval=10, num_dev=5, seed=3)
    task = build_task(cfg)
    assert task.eval_set == build_task(cfg).eval_set
    held = {ex.prompt for ex in task.eval_set + task.dev_set}
    assert len(held) == 15
    assert not held & {ex.prompt for ex in task.sample_train(random.Random(0), 100)}
    assert task.score("7", "7") == (1.0, True)


@pytest.mark.timeout(10)
def test_jsonl_bad_line_names_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        build_task(TaskConfig(name="jsonl", jsonl_path=str(path), num_eval=1, num_dev=0))
