"""Reading a dataset file into examples: JSONL, Parquet, or a Hugging Face ``datasets`` folder (save_to_disk).

Column conventions, per row (the first that fits):
- ours: ``prompt`` (a string) + ``answer`` (a string or number);
- chat: ``messages`` (a list of {role, content}); the last assistant message, if any, is the answer (or ``answer``);
- verl: ``prompt`` (a list of chat messages) + ``reward_model.ground_truth``, with ``data_source`` as the source.
Every problem is a ``DataError`` naming the file and the line (or row), raised before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.data.tokenizer import render_messages

FORMAT_HINT = ('each row needs {"prompt": "...", "answer": "..."}, {"messages": [...]} or verl-style '
               '{"prompt": [messages], "reward_model": {"ground_truth": ...}}')


class DataError(ValueError):
    """A dataset problem; the message names the file, the line and the fix."""


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str  # the prompt as text (for messages: rendered; also the prompt's identity for splits)
    answer: str  # the text the model must produce (before eos)
    source: str  # "arithmetic", the data file, or the row's data_source
    difficulty: int  # arithmetic: digits of the longer operand; data: 1
    messages: tuple | None = None  # chat prompts: ({"role", "content"}, ...), fed through the chat template


def _messages(value, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise DataError(f"{where}: messages must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _answer(value, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: {key} must be a string or number, got {type(value).__name__}; {FORMAT_HINT}")
    return str(value)


def row_to_example(row, where: str, default_source: str) -> Example:
    """One row (a dict) in any of the conventions above -> an Example."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}; {FORMAT_HINT}")
    source = str(row.get("data_source") or row.get("source") or default_source)
    prompt = row.get("prompt")
    if "messages" in row and prompt is None:
        msgs = _messages(row["messages"], where)
        if "answer" in row:
            answer = _answer(row["answer"], where, "answer")
        elif msgs[-1]["role"] == "assistant" and len(msgs) > 1:
            msgs, answer = msgs[:-1], msgs[-1]["content"]
        else:
            raise DataError(f"{where}: a messages row needs a final assistant message or an \"answer\"")
        return Example(render_messages(msgs), answer, source, 1, msgs)
    if isinstance(prompt, (list, tuple)):  # verl
        msgs = _messages(prompt, where)
        rm = row.get("reward_model")
        if isinstance(rm, dict) and "ground_truth" in rm:
            answer = _answer(rm["ground_truth"], where, "reward_model.ground_truth")
        elif "answer" in row:
            answer = _answer(row["answer"], where, "answer")
        else:
            raise DataError(f"{where}: missing reward_model.ground_truth (verl-style row); {FORMAT_HINT}")
        return Example(render_messages(msgs), answer, source, 1, msgs)
    if not isinstance(prompt, str):
        missing = "prompt" if prompt is None else f"prompt of type {type(prompt).__name__}"
        raise DataError(f"{where}: missing or bad {missing}; {FORMAT_HINT}")
    if "answer" not in row:
        raise DataError(f"{where}: missing \"answer\"; {FORMAT_HINT}")
    return Example(prompt, _answer(row["answer"], where, "answer"), source, 1)


def _jsonl_rows(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); re-save the file "
                                "as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"{FORMAT_HINT}") from None


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError kinds
        raise DataError(f"{path}: cannot read it as Parquet ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {i}", row


def _hf_folder_rows(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a datasets folder needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load it with datasets.load_from_disk ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(ds)}); save one split")
        ds = ds["train"]
    for i, row in enumerate(ds, 1):
        yield f"{path}: row {i}", row


def read_examples(path: str) -> list[Example]:
    """Every example in ``path`` (.jsonl/.json lines, .parquet, or a save_to_disk folder), in file order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file (task.jsonl_path); pass the path of a .jsonl, .parquet or "
                        "datasets folder")
    if p.is_dir():
        rows = _hf_folder_rows(p)
    elif p.suffix == ".parquet":
        rows = _parquet_rows(p)
    else:
        rows = _jsonl_rows(p)
    out = [row_to_example(row, where, str(path)) for where, row in rows]
    if not out:
        raise DataError(f"{path}: holds no examples; {FORMAT_HINT}")
    return out
