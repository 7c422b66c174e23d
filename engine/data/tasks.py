"""Tasks: prompts, reference answers and the verifier (tokenizers: engine/data/tokenizer.py).

``arithmetic`` (built in) asks ``"37+485="``; by default the answer is written with its
digits reversed (least significant first, ``"225"`` for 522, then EOS), because a small model then
produces each digit right after the carry it depends on, and learns in a fraction of the steps that
the usual order needs (``task.reverse_answer=false`` writes the usual order). ``jsonl`` reads a dataset file
(JSONL, Parquet or a ``datasets`` folder; engine/data/datasets.py); its eval and dev sets take at most half of the
data (scaled down with a warning), and its training prompts are served in epochs, each in a new seeded order.
Eval, dev and train prompts never overlap. ``scratchpad``, ``countdown`` and ``sorting`` (built in, with worked
solutions at difficulty levels ``task.min_level``..``task.max_level``: engine/data/reasoning.py) are scored on their
final answer only (engine/data/reasoning_check.py; the same check is their reward plugin).
"""

from __future__ import annotations

import functools
import json
import random
import warnings
from collections.abc import Iterator
from typing import Callable

from configs.schema import RunConfig, TaskConfig
from engine.data.datasets import DataError, Example, read_examples
from engine.data.reasoning import GENERATORS, draw_level
from engine.data.reasoning_check import check_countdown, check_final
from engine.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

__all__ = ["CharTokenizer", "DataError", "Example", "Task", "build_task", "load_task", "read_pool"]
Tokenizer = CharTokenizer | HFTokenizer


def normalise(text: str) -> str:
    return " ".join(text.split())


class Task:
    """Prompts and verifier. ``sample_train`` never returns an eval or dev prompt."""

    def __init__(self, name: str, eval_set: list[Example], dev_set: list[Example],
                 draw_train: Callable[[random.Random], Example], max_answer_tokens: int,
                 tokenizer: Tokenizer | None = None, train_set: list[Example] | None = None,
                 verify: Callable[[str, str], tuple[float, bool]] | None = None) -> None:
        self.name = name
        self._verify = verify  # (response, reference) -> (reward, valid); None: exact match
        self.max_answer_tokens = max_answer_tokens  # generation limit, eos included
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
        self.train_set = train_set  # a finite dataset's training examples (served in epochs), else None
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
        valid=False only when there is no reference answer to judge against. A task with its own verifier (the
        reasoning tasks: the final answer only) scores with it."""
        if self._verify is not None:
            return self._verify(response_text, answer)
        ref = normalise(answer)
        if not ref:
            return 0.0, False
        return (1.0 if normalise(response_text) == ref else 0.0), True

    def train_stream(self, seed: int, pool_path: str | None = None) -> Iterator[tuple[int, Example, float | None]]:
        """Endless RL prompts as (prompt id, example, offline pass rate or None), the same sequence for a seed.

        Without a pool: a dataset's training examples in epochs, each in a new seeded order (a prompt keeps its id,
        1_000_000 + its index); the built-in task: fresh draws (ids from 1_000_000 on, each prompt once).
        With ``pool_path`` (a jsonl of prompt/answer[/source/pass_rate], e.g. written by everyprompt-filter-pool):
        the pool in a new seeded order every epoch; a prompt keeps its id (1_000_000 + its line) across epochs.
        Eval and dev prompts never appear."""
        if pool_path is None and self.train_set is not None:
            yield from _epochs([(i, ex, None) for i, ex in enumerate(self.train_set)], seed)
        if pool_path is None:
            rng, prompt_id = random.Random(seed), 1_000_000
            while True:
                for ex in self.sample_train(rng, 256):
                    yield prompt_id, ex, None
                    prompt_id += 1
        pool = [(i, ex, rate) for i, (ex, rate) in enumerate(read_pool(pool_path)) if ex.prompt not in self._held_out]
        if not pool:
            raise ValueError(f"{pool_path}: no training prompt left (empty, or all in the eval/dev sets)")
        yield from _epochs(pool, seed)

    def prompt_ids(self, ex: Example) -> list[int]:
        return self.tokenizer.prompt_ids(ex.prompt, ex.messages)

    def long_answers(self) -> tuple[int, int, int]:
        """(held-out answers longer than the generation limit, how many were checked, the longest in tokens + eos)."""
        lengths = [len(self.tokenizer.encode(ex.answer)) + 1 for ex in self.eval_set + self.dev_set]
        return sum(n > self.max_answer_tokens for n in lengths), len(lengths), max(lengths, default=0)

    def sft_ids(self, ex: Example) -> tuple[list[int], list[int]]:
        """(input_ids, loss_mask), aligned: loss_mask[t] = 1 where input_ids[t] is a target (answer + eos)."""
        prompt = self.prompt_ids(ex)
        target = self.tokenizer.encode(ex.answer) + [self.tokenizer.eos_id]
        return prompt + target, [0] * len(prompt) + [1] * len(target)


def _epochs(items: list[tuple[int, Example, float | None]], seed: int):
    """Endless (1_000_000 + id, example, rate): every item once per epoch, each epoch in a new seeded order."""
    epoch = 0
    while True:
        order = list(range(len(items)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for j in order:
            i, ex, rate = items[j]
            yield 1_000_000 + i, ex, rate
        epoch += 1


def _arithmetic(cfg: TaskConfig, tokenizer: Tokenizer | None) -> Task:
    lo, hi = cfg.min_digits, cfg.max_digits

    def operand(rng: random.Random, digits: int) -> int:
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def draw(rng: random.Random) -> Example:
        da, db = rng.randint(lo, hi), rng.randint(lo, hi)  # digit counts drawn independently
        a, b = operand(rng, da), operand(rng, db)
        answer = str(a + b)[::-1] if cfg.reverse_answer else str(a + b)
        return Example(prompt=f"{a}+{b}=", answer=answer, source=f"add-{max(da, db)}d", difficulty=max(da, db))

    held = _distinct(draw, random.Random(cfg.seed), cfg.num_eval + cfg.num_dev, "task.max_digits")
    limit = cfg.max_answer_tokens or ARITHMETIC_ANSWER_TOKENS
    return Task("arithmetic", held[: cfg.num_eval], held[cfg.num_eval:], draw, limit, tokenizer)


ARITHMETIC_ANSWER_TOKENS = 8  # the built-in task's generation limit (a 5-digit sum + EOS, with room to spare)


def _distinct(draw: Callable[[random.Random], Example], rng: random.Random, n: int, widen: str) -> list[Example]:
    """``n`` draws with distinct prompts (a small bucket, e.g. 1-digit sums, repeats); a one-line error naming the
    key to ``widen`` when the distribution has too few distinct prompts."""
    seen: set[str] = set()
    held: list[Example] = []
    for _ in range(100 * n + 10_000):
        ex = draw(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            held.append(ex)
            if len(held) == n:
                return held
    raise DataError(f"the task has too few distinct prompts for task.num_eval + task.num_dev = {n} held-out ones "
                    f"(and training prompts besides): widen {widen}, or lower task.num_eval/task.num_dev")


REASONING_CHECKS = {"scratchpad": check_final, "sorting": check_final, "countdown": check_countdown}
_LIMIT_SAMPLES = 2000  # hardest-level draws the derived generation limit of a reasoning task looks at


@functools.lru_cache(maxsize=16)
def reasoning_limit(name: str, max_level: int, seed: int) -> int:
    """A reasoning task's generation limit: its longest worked solution among ``_LIMIT_SAMPLES`` draws at
    ``max_level``, in characters (no fewer than tokens, for the character tokenizer and byte-level BPEs on ASCII),
    + EOS, + 25% of room."""
    rng = random.Random(seed + 1)
    longest = max(len(GENERATORS[name](rng, max_level).answer) + 1 for _ in range(_LIMIT_SAMPLES))
    return -(-longest * 5 // 4)


def _reasoning(cfg: TaskConfig, tokenizer: Tokenizer | None) -> Task:
    generate = GENERATORS[cfg.name]

    def draw(rng: random.Random) -> Example:
        return generate(rng, draw_level(rng, cfg.min_level, cfg.max_level))

    held = _distinct(draw, random.Random(cfg.seed), cfg.num_eval + cfg.num_dev, "task.min_level..task.max_level")
    limit = cfg.max_answer_tokens or reasoning_limit(cfg.name, cfg.max_level, cfg.seed)
    return Task(cfg.name, held[: cfg.num_eval], held[cfg.num_eval:], draw, limit, tokenizer,
                verify=REASONING_CHECKS[cfg.name])


def generation_limit(cfg: TaskConfig) -> int:
    """``task.max_answer_tokens`` of a resolved config (everyprompt-train derives it from the data when unset:
    engine/coordinator/preflight.py); unset, the built-in task's limit."""
    if cfg.max_answer_tokens is not None:
        return cfg.max_answer_tokens
    if cfg.name == "arithmetic":
        return ARITHMETIC_ANSWER_TOKENS
    if cfg.name in REASONING_CHECKS:
        return reasoning_limit(cfg.name, cfg.max_level, cfg.seed)
    raise ValueError(f"task.max_answer_tokens is unset for task.name={cfg.name}: start the run with "
                     "everyprompt-train (it derives the limit from the data) or set task.max_answer_tokens")


def answer_limit(tok: Tokenizer, examples: list[Example]) -> int:
    """The generation limit a dataset needs: its longest reference answer in tokens, + EOS, + 25% of room."""
    longest = max((len(tok.encode(ex.answer)) + 1 for ex in examples), default=ARITHMETIC_ANSWER_TOKENS)
    return max(ARITHMETIC_ANSWER_TOKENS, -(-longest * 5 // 4))


def split_sizes(n: int, num_eval: int, num_dev: int, where: str) -> tuple[int, int]:
    """Eval and dev sizes for a dataset of ``n`` examples: as configured while they take at most half of it,
    else scaled down in proportion (with a warning naming the keys)."""
    if num_eval + num_dev <= n // 2:
        return num_eval, num_dev
    budget = max(n // 2, 1)
    ev = max(1, budget * num_eval // (num_eval + num_dev))
    dev = min(num_dev, max(budget - ev, 1 if num_dev else 0))
    if n - ev - dev < 1:
        raise DataError(f"{where} has {n} examples: too few for an eval set and training prompts; add examples")
    warnings.warn(f"{where} has {n} examples: task.num_eval={num_eval} + task.num_dev={num_dev} would leave "
                  f"{max(n - num_eval - num_dev, 0)} for training; using num_eval={ev} num_dev={dev} "
                  f"({n - ev - dev} training examples); set task.num_eval/task.num_dev to choose", stacklevel=3)
    return ev, dev


def _dataset(cfg: TaskConfig, tokenizer: Tokenizer | None) -> Task:
    tok = tokenizer if tokenizer is not None else CharTokenizer()
    examples = read_examples(cfg.jsonl_path)
    for i, ex in enumerate(examples):
        try:
            tok.encode(ex.prompt + ex.answer)
        except ValueError as e:
            raise DataError(f"{cfg.jsonl_path}: example {i + 1}: {e}") from None
    num_eval, num_dev = split_sizes(len(examples), cfg.num_eval, cfg.num_dev, cfg.jsonl_path)
    random.Random(cfg.seed).shuffle(examples)
    eval_set, dev_set = examples[:num_eval], examples[num_eval: num_eval + num_dev]
    held = {ex.prompt for ex in eval_set} | {ex.prompt for ex in dev_set}
    train = [ex for ex in examples[num_eval + num_dev:] if ex.prompt not in held]
    if not train:
        raise DataError(f"{cfg.jsonl_path}: every training prompt also appears in eval/dev; add examples")
    limit = cfg.max_answer_tokens or answer_limit(tok, examples)
    return Task("jsonl", eval_set, dev_set, lambda rng: rng.choice(train), limit, tok, train)


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


def build_task(cfg: TaskConfig, tokenizer: Tokenizer | None = None) -> Task:
    """The task of ``cfg`` with ``tokenizer`` (default: the built-in character tokenizer)."""
    if cfg.name in REASONING_CHECKS:
        return _reasoning(cfg, tokenizer)
    return _arithmetic(cfg, tokenizer) if cfg.name == "arithmetic" else _dataset(cfg, tokenizer)


def load_task(cfg: RunConfig) -> Task:
    """The run's task with the run's tokenizer (``model.init_from``'s own, else the built-in one)."""
    return build_task(cfg.task, load_tokenizer(cfg.model))
