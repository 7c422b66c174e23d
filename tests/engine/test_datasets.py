"""Dataset files and tokenizers: the column conventions, the file formats, epochs, split sizes, data errors."""

import itertools
import warnings

import pytest

from configs.schema import ModelConfig, TaskConfig
from engine.data.datasets import DataError, read_examples
from engine.data.tasks import build_task
from engine.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer
from tests.byo_models import make_tokenizer, unicode_rows, write_jsonl

pytestmark = pytest.mark.timeout(60)

CHAT = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
VERL = {"prompt": [{"role": "user", "content": "3+3?"}], "reward_model": {"ground_truth": 6}, "data_source": "gsm"}


def test_every_column_convention_reads(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": "1+1=", "answer": 2}, CHAT, VERL])
    ours, chat, verl = read_examples(str(path))
    assert (ours.prompt, ours.answer, ours.messages) == ("1+1=", "2", None)
    assert chat.answer == "4" and chat.messages == ({"role": "user", "content": "2+2?"},)
    assert verl.answer == "6" and verl.source == "gsm" and verl.messages[0]["content"] == "3+3?"
    assert chat.prompt != verl.prompt  # a chat prompt's identity is its rendered text


def test_parquet_and_datasets_folder_read_the_same_rows(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [(e.prompt, e.answer) for e in read_examples(str(tmp_path / "d.parquet"))] == [
        (r["prompt"], r["answer"]) for r in rows]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert [e.answer for e in read_examples(str(tmp_path / "hf"))] == [r["answer"] for r in rows]


@pytest.mark.parametrize("content, match", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n', r"bad\.jsonl:2: not UTF-8"),
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", \n', r"bad\.jsonl:2: not valid JSON"),
    (b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n', r"bad\.jsonl:3: missing \"answer\""),
    (b'{"answer": "1"}\n', r"bad\.jsonl:1: missing or bad prompt"),
    (b'{"prompt": [{"role": "user", "content": "x"}]}\n', r"bad\.jsonl:1: missing reward_model\.ground_truth"),
    (b"\n\n", r"bad\.jsonl: holds no examples"),
])
def test_data_errors_name_the_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_examples(str(tmp_path / "bad.jsonl"))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(str(tmp_path / "nope.jsonl"))


def test_training_prompts_come_in_seeded_epochs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}?", "answer": i} for i in range(40)])
    task = build_task(TaskConfig(name="jsonl", jsonl_path=str(path), num_eval=5, num_dev=5))
    n = len(task.train_set)
    stream = [(pid, ex.prompt) for pid, ex, _ in itertools.islice(task.train_stream(seed=7), 3 * n)]
    epochs = [stream[i * n:(i + 1) * n] for i in range(3)]
    for epoch in epochs:  # every training prompt exactly once per epoch, none held out
        assert sorted(p for _, p in epoch) == sorted(ex.prompt for ex in task.train_set)
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert stream == [(pid, ex.prompt) for pid, ex, _ in itertools.islice(task.train_stream(seed=7), 3 * n)]


def test_split_sizes_scale_with_a_small_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}?", "answer": i} for i in range(100)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = build_task(TaskConfig(name="jsonl", jsonl_path=str(path)))  # defaults: 500 eval + 200 dev
    assert len(task.eval_set) + len(task.dev_set) <= 50 and len(task.train_set) >= 50
    assert len(task.dev_set) >= 1 and any("task.num_eval" in str(w.message) for w in caught)


def test_hf_tokenizer_handles_unicode_and_long_answers(tmp_path):
    rows = unicode_rows(30)
    make_tokenizer([r["prompt"] + r["answer"] for r in rows], tmp_path / "tok")
    tok = load_tokenizer(ModelConfig(init_from=str(tmp_path / "tok")))
    assert isinstance(tok, HFTokenizer)
    assert tok.decode(tok.encode("東京 café") + [tok.eos_id, 7]) == "東京 café"
    assert tok.prompt_ids("x")[0] == tok.bos_id
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    task = build_task(TaskConfig(name="jsonl", jsonl_path=str(path), num_eval=4, num_dev=2,
                                 max_answer_tokens=2), tok)
    too_long, checked, longest = task.long_answers()
    assert checked == 6 and too_long >= 1 and longest > 2
    with pytest.raises(ValueError, match="not in the tokenizer"):  # the built-in one still refuses it
        build_task(TaskConfig(name="jsonl", jsonl_path=str(path), num_eval=4, num_dev=2))


def test_char_tokenizer_saves_as_an_hf_tokenizer_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer()
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "37+485= 1\nab"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)


def test_chat_rows_use_the_chat_template(tmp_path):
    hf = make_tokenizer(["user says hi", "assistant answers"], tmp_path / "tok")
    hf.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = HFTokenizer(str(tmp_path / "tok"))
    ids = tok.prompt_ids("ignored", ({"role": "user", "content": "hi"},))
    assert tok._tok.decode(ids) == "<s>user: hi\nassistant:"
