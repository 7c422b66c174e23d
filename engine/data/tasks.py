"""Tasks: prompts, reference answers, the verifier and the character tokenizer.

Two tasks exist. ``arithmetic`` (built in) asks ``"37+485="``; by default the answer is written with its
digits reversed (least significant first, ``"225"`` for 522, then EOS), because a small model then
produces each digit right after the carry it depends on, and learns in a fraction of the steps that
the usual order needs (``task.reverse_answer=false`` writes the usual order). ``jsonl`` reads
``{"prompt": ..., "answer": ...}`` lines. Eval, dev and train prompts never overlap.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable

from configs.schema import TaskConfig

_SPECIALS = ("<pad>", "<bos>", "<eos>")
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


class CharTokenizer:
    """One id per character: 0 pad, 1 bos, 2 eos, then newline and printable ASCII (98 ids in all)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.vocab: list[str] = list(_SPECIALS) + list(_CHARS)
        self._ids = {ch: i for i, ch in enumerate(self.vocab) if i >= len(_SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer vocabulary "
                             "(newline and printable ASCII only)") from None

    def decode(self, ids: list[int]) -> str:
        """Text up to the first eos; pad and bos are skipped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(_SPECIALS):
                out.append(self.vocab[i])
        return "".join(out)


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    answer: str  # the text the model must produce (before eos)
    source: str  # "arithmetic" or the jsonl path
    difficulty: int  # arithmetic: digits of the longer operand; jsonl: 1


def normalise(text: str) -> str:
    return " ".join(text.split())


class Task:
    """Prompts and verifier. ``sample_train`` never returns an eval or dev prompt."""

    def __init__(self, name: str, eval_set: list[Example], dev_set: list[Example],
                 draw_train: Callable[[random.Random], Example], max_answer_tokens: int) -> None:
        self.name = name
        self.max_answer_tokens = max_answer_tokens  # generation limit, eos included
        self.tokenizer = CharTokenizer()
        self.eval_set, self.dev_set = eval_set, dev_set
        self._draw_train = draw_train
        self._held_out = {ex.prompt for ex in eval_set} | {ex.prompt for ex in dev_set}

    def sample_train(self, rng: random.Random, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            ex = self._draw_train(rng)
            if ex.prompt not in self._held_out:
                out.append(ex)
        return out

    def score(self, response_text: str, answer: str) -> tuple[float, bool]:
        """(reward, valid): 1.0 for an exact answer after whitespace normalisation, else 0.0.
        valid=False only when there is no reference answer to judge against."""
        ref = normalise(answer)
        if not ref:
            return 0.0, False
        return (1.0 if normalise(response_text) == ref else 0.0), True

    def train_stream(self, seed: int, pool_path: str | None = None) -> Iterator[tuple[int, Example, float | None]]:
        """Endless RL prompts as (prompt id, example, offline pass rate or None), the same sequence for a seed.

        Without a pool: fresh draws of the training distribution (ids from 1_000_000 on, each prompt once).
        With ``pool_path`` (a jsonl of prompt/answer[/source/pass_rate], e.g. written by everyprompt-filter-pool):
        the pool in a new seeded order every epoch; a prompt keeps its id (1_000_000 + its line) across epochs.
        Eval and dev prompts never appear."""
        if pool_path is None:
            rng, prompt_id = random.Random(seed), 1_000_000
            while True:
                for ex in self.sample_train(rng, 256):
                    yield prompt_id, ex, None
                    prompt_id += 1
        pool = [(i, ex, rate) for i, (ex, rate) in enumerate(read_pool(pool_path)) if ex.prompt not in self._held_out]
        if not pool:
            raise ValueError(f"{pool_path}: no training prompt left (empty, or all in the eval/dev sets)")
        epoch = 0
        while True:
            order = list(range(len(pool)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for j in order:
                i, ex, rate = pool[j]
                yield 1_000_000 + i, ex, rate
            epoch += 1

    def prompt_ids(self, ex: Example) -> list[int]:
        return [self.tokenizer.bos_id] + self.tokenizer.encode(ex.prompt)

    def sft_ids(self, ex: Example) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask), aligned: loss_mask[t] = 1 where input_ids[t] is a target (answer + eos)."""
        prompt = self.prompt_ids(ex)
        target = self.tokenizer.encode(ex.answer) + [self.tokenizer.eos_id]
        return prompt + target, [0] * len(prompt) + [1] * len(target)


def _arithmetic(cfg: TaskConfig) -> Task:
    lo, hi = cfg.min_digits, cfg.max_digits

    def operand(rng: random.Random, digits: int) -> int:
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def draw(rng: random.Random) -> Example:
        da, db = rng.randint(lo, hi), rng.randint(lo, hi)  # digit counts drawn independently
        a, b = operand(rng, da), operand(rng, db)
        answer = str(a + b)[::-1] if cfg.reverse_answer else str(a + b)
        return Example(prompt=f"{a}+{b}=", answer=answer, source=f"add-{max(da, db)}d", difficulty=max(da, db))

    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    held: list[Example] = []
    while len(held) < cfg.num_eval + cfg.num_dev:  # the 1-digit bucket has only 100 prompts; dedupe
        ex = draw(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            held.append(ex)
    return Task("arithmetic", held[: cfg.num_eval], held[cfg.num_eval:], draw, cfg.max_answer_tokens)


def _jsonl(cfg: TaskConfig) -> Task:
    examples: list[Example] = []
    with open(cfg.jsonl_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, answer = row["prompt"], row["answer"]
                if not isinstance(prompt, str) or not isinstance(answer, (str, int, float)):
                    raise TypeError("prompt must be a string and answer a string or number")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{cfg.jsonl_path}:{lineno}: bad line ({e!r}); each line must be "
                                 '{"prompt": "...", "answer": "..."}') from None
            examples.append(Example(prompt=prompt, answer=str(answer), source=cfg.jsonl_path, difficulty=1))
    need = cfg.num_eval + cfg.num_dev + 1
    if len(examples) < need:
        raise ValueError(f"{cfg.jsonl_path} has {len(examples)} examples, but task.num_eval={cfg.num_eval} + "
                         f"task.num_dev={cfg.num_dev} + 1 training example are needed; lower task.num_eval")
    tok = CharTokenizer()
    for i, ex in enumerate(examples):
        try:
            tok.encode(ex.prompt + ex.answer)
        except ValueError as e:
            raise ValueError(f"{cfg.jsonl_path}: example {i + 1}: {e}") from None
    random.Random(cfg.seed).shuffle(examples)
    eval_set, dev_set = examples[: cfg.num_eval], examples[cfg.num_eval: cfg.num_eval + cfg.num_dev]
    held = {ex.prompt for ex in eval_set} | {ex.prompt for ex in dev_set}
    train = [ex for ex in examples[cfg.num_eval + cfg.num_dev:] if ex.prompt not in held]
    if not train:
        raise ValueError(f"{cfg.jsonl_path}: every training prompt also appears in eval/dev; add examples")
    return Task("jsonl", eval_set, dev_set, lambda rng: rng.choice(train), cfg.max_answer_tokens)


def read_pool(path: str) -> list[tuple[Example, float | None]]:
    """A prompt pool: jsonl lines {"prompt", "answer"[, "source", "pass_rate", "difficulty"]}."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ex = Example(prompt=row["prompt"], answer=str(row["answer"]), source=str(row.get("source", path)),
                             difficulty=int(row.get("difficulty", 1)))
                rate = row.get("pass_rate")
                out.append((ex, None if rate is None else float(rate)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: bad pool line ({e!r}); each line must be "
                                 '{"prompt": "...", "answer": "..."} plus optional "source" and "pass_rate"') from None
    return out


def build_task(cfg: TaskConfig) -> Task:
    return _arithmetic(cfg) if cfg.name == "arithmetic" else _jsonl(cfg)
