"""Which rollout worker generates which group: FIFO (the baseline) or length-aware (ALGORITHMS.md B.6).

``fifo``: groups go out in arrival order, each to the worker with the fewest outstanding samples.

``length_aware``: each group gets a predicted response length (``LengthPredictor``: an EMA of the prompt's
earlier mean lengths, else its source's, else the mean of everything seen). Groups admitted together go out
longest predicted first (LPT), each to the worker with the fewest predicted outstanding tokens. All samples of a
group stay on one worker, so its prompt is prefilled once (prefix reuse). Workers decode their queue in order,
so the longest responses also start first on each worker, and fewer workers idle waiting for the last long
sequence.

Pure bookkeeping: no I/O, no clocks; engine/coordinator/dispatch.py calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


MAX_PROMPTS = 1 << 16  # per-prompt EMAs kept (about 100 bytes each); the least recently seen goes first


class LengthPredictor:
    """Predicted response length of a prompt: EMA (weight ``ema`` on the newest) of its groups' mean lengths,
    falling back to its source's EMA, then to the mean of every length seen, then to ``default``.

    The per-prompt table keeps the ``max_prompts`` most recently observed prompts: a run on an endless stream of
    fresh prompts (the built-in tasks) never sees a prompt twice, and an unbounded table grew the coordinator by
    every group for the whole run (``everyprompt-bench soak``). A dataset smaller than the bound keeps all."""

    def __init__(self, *, ema: float = 0.5, default: float = 1.0, max_prompts: int = MAX_PROMPTS) -> None:
        self._ema, self._default, self._max_prompts = ema, default, max_prompts
        self._prompt: OrderedDict[Hashable, float] = OrderedDict()
        self._source: dict[str, float] = {}
        self._sum, self._count = 0.0, 0

    def predict(self, prompt_id: Hashable, source: str = "") -> float:
        if prompt_id in self._prompt:
            return self._prompt[prompt_id]
        if source in self._source:
            return self._source[source]
        return self._sum / self._count if self._count else self._default

    def observe(self, prompt_id: Hashable, source: str, lengths: Sequence[int]) -> None:
        """A group of ``prompt_id`` finished with these response lengths."""
        if not lengths:
            return
        mean = sum(lengths) / len(lengths)
        for table, key in ((self._prompt, prompt_id), (self._source, source)):
            old = table.get(key)
            table[key] = mean if old is None else (1 - self._ema) * old + self._ema * mean
        self._prompt.move_to_end(prompt_id)
        while len(self._prompt) > self._max_prompts:
            self._prompt.popitem(last=False)
        self._sum += sum(lengths)
        self._count += len(lengths)

    @property
    def known_prompts(self) -> int:
        return len(self._prompt)


class Scheduler:
    """Worker choice and order for groups. ``load[w]`` is the work outstanding on worker ``w``: samples (fifo)
    or predicted tokens (length_aware); the caller adds what it assigns and subtracts what finishes."""

    def __init__(self, policy: str = "fifo", predictor: LengthPredictor | None = None) -> None:
        if policy not in ("fifo", "length_aware"):
            raise ValueError(f"rollout.schedule={policy!r} is invalid: choose fifo or length_aware")
        self.policy = policy
        self.predictor = predictor or LengthPredictor()
        self.load: dict[str, float] = {}

    def add_worker(self, worker: str) -> None:
        self.load.setdefault(worker, 0.0)

    def remove_worker(self, worker: str) -> None:
        self.load.pop(worker, None)

    def cost(self, prompt_id: Hashable, source: str, num_samples: int) -> float:
        """What a group adds to its worker's load."""
        if self.policy == "fifo":
            return float(num_samples)
        return num_samples * self.predictor.predict(prompt_id, source)

    def order(self, groups: Sequence[tuple[Hashable, str, int]]) -> list[int]:
        """Dispatch order of groups given as (prompt_id, source, num_samples): arrival order (fifo) or longest
        predicted first (length_aware; ties keep arrival order)."""
        idx = list(range(len(groups)))
        if self.policy == "length_aware":
            idx.sort(key=lambda i: -self.predictor.predict(groups[i][0], groups[i][1]))
        return idx

    def pick(self, workers: Sequence[str]) -> str:
        """The least-loaded of ``workers`` (the first one on ties)."""
        return min(workers, key=lambda w: self.load.get(w, 0.0))
