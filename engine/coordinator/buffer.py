"""Groups waiting for the learner, and the records they are made of (built chunk by chunk while generated).

The buffer serves the oldest policy version first (FIFO within a version) and enforces the per-token staleness
bound: ``take`` never returns a group holding a token older than ``min_version``. Groups over the bound are handed
to its ``StaleHandler`` (engine/coordinator/staleness.py regenerates their stale samples, or drops them, by policy);
admission pacing keeps this at zero in steady state.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

_I32 = np.int32


@dataclass
class Sample:
    """One response of a group: its chunks as they stream in, then the whole response and its reward."""

    sample_index: int
    token_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, _I32))  # int32 [T]
    behavior_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # float32 [T]
    token_versions: np.ndarray = field(default_factory=lambda: np.zeros(0, _I32))  # int32 [T]
    routes: np.ndarray | None = None  # [T - 1, layers, k] MoE routes (None when not recorded)
    finish_reason: str = ""  # "" while generating
    reward: float | None = None  # None until scored
    valid: bool = False
    reward_parts: dict[str, float] = field(default_factory=dict)
    _chunks: list[tuple] = field(default_factory=list, repr=False)  # appended, not yet concatenated
    _length: int = 0
    _unrouted: bool = False  # some chunk came without routes

    @property
    def length(self) -> int:
        return self._length

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def append(self, tokens: np.ndarray, logprobs: np.ndarray, versions: np.ndarray,
               routes: np.ndarray | None) -> None:
        self._chunks.append((tokens, logprobs, versions, routes))
        self._length += len(tokens)
        self._unrouted |= routes is None

    def flush(self) -> "Sample":
        """Concatenate the streamed chunks into the arrays (cheap to call again)."""
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            self.token_ids = np.concatenate([self.token_ids] + [c[0] for c in chunks]).astype(_I32, copy=False)
            self.behavior_logprobs = np.concatenate([self.behavior_logprobs] + [c[1] for c in chunks]).astype(
                np.float32, copy=False)
            self.token_versions = np.concatenate([self.token_versions] + [c[2] for c in chunks]).astype(
                _I32, copy=False)
            old = [] if self.routes is None else [self.routes]
            self.routes = None if self._unrouted else np.concatenate(old + [c[3] for c in chunks])
        return self

    def reset(self) -> None:
        """Forget everything generated (the sample will be generated again)."""
        fresh = Sample(self.sample_index)
        self.__dict__.update(fresh.__dict__)

    @property
    def min_version(self) -> int:
        self.flush()
        return int(self.token_versions.min()) if len(self.token_versions) else 1 << 30


@dataclass
class Group:
    """The G responses to one prompt."""

    group_id: str
    prompt_id: int
    prompt_ids: np.ndarray  # int32 [P]
    answer: str
    num_samples: int
    temperature: float = 1.0
    prompt_routes: np.ndarray | None = None  # [P, layers, k], sent once per group
    samples: dict[int, Sample] = field(default_factory=dict)
    source: str = ""  # where the prompt comes from (per-source zero-variance statistics)
    initial_samples: int = 0  # samples asked for at admission (more may be added by a top-up); 0 = num_samples

    def __post_init__(self) -> None:
        self.initial_samples = self.initial_samples or self.num_samples
        for i in range(self.num_samples):
            self.samples.setdefault(i, Sample(i))

    def add_samples(self, n: int) -> list[int]:
        """Top-up: ``n`` more samples of the same prompt; returns their indices."""
        new = list(range(self.num_samples, self.num_samples + n))
        for i in new:
            self.samples[i] = Sample(i)
        self.num_samples += n
        return new

    @property
    def complete(self) -> bool:
        return all(s.finished and s.reward is not None for s in self.samples.values())

    @property
    def min_version(self) -> int:
        return min(s.min_version for s in self.samples.values())

    def ordered(self) -> list[Sample]:
        return [self.samples[i].flush() for i in range(self.num_samples)]


def priority(g: Group, *, newest_version: int, staleness_weight: float) -> float:
    """Variance-aware priority: the std of the group's rewards (an informative group has spread) minus
    ``staleness_weight`` per version it is behind the newest buffered group."""
    rewards = [s.reward for s in g.ordered() if s.valid]
    spread = float(np.std(rewards)) if len(rewards) > 1 else 0.0
    return spread - staleness_weight * (newest_version - g.min_version)


class StaleHandler(Protocol):
    async def over_bound(self, groups: list[Group], min_version: int) -> None:
        """Groups taken out of the buffer because they hold a token older than ``min_version``."""


class GroupBuffer:
    """consumes: complete groups (rollout + reward)   produces: lists of groups (learner)   blocks on: take()

    ``order="fifo"``: oldest policy version first. ``order="variance"``: groups that would be over the staleness
    bound at the next step go first (oldest first), then the highest ``priority``; so priority never pushes a
    group past the bound. ``last_take`` describes the priorities of the latest take."""

    def __init__(self, stale: StaleHandler | None = None, *, order: str = "fifo", staleness_weight: float = 0.1
                 ) -> None:
        self._stale = stale  # gets the groups that hold a token older than the bound
        self._groups: deque[Group] = deque()
        self._changed = asyncio.Event()
        self._order, self._staleness_weight = order, staleness_weight
        self.last_take: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def groups(self) -> list[Group]:
        return list(self._groups)

    def put(self, group: Group) -> None:
        self._groups.append(group)
        self._changed.set()

    async def take(self, n: int, *, min_version: int) -> list[Group]:
        """Wait for ``n`` groups whose every token is at least ``min_version``; staler ones go to the StaleHandler."""
        while True:
            stale = [g for g in self._groups if g.min_version < min_version]
            if stale:
                self._groups = deque(g for g in self._groups if g.min_version >= min_version)
                if self._stale is not None:
                    await self._stale.over_bound(stale, min_version)
            if len(self._groups) >= n:
                ordered, prio = self._ordered(min_version)
                self._groups = deque(ordered[n:])
                self.last_take = {"buffer_groups": float(len(ordered)),
                                  "buffer_priority_taken": float(np.mean(prio[:n])),
                                  "buffer_priority_left": float(np.mean(prio[n:])) if len(prio) > n else 0.0,
                                  "buffer_priority_max": float(prio.max()), "buffer_priority_min": float(prio.min())}
                return ordered[:n]
            self._changed.clear()
            await self._changed.wait()

    def _ordered(self, min_version: int) -> tuple[list[Group], np.ndarray]:
        newest = max(g.min_version for g in self._groups)
        prio = {id(g): priority(g, newest_version=newest, staleness_weight=self._staleness_weight)
                for g in self._groups}
        if self._order == "fifo":  # FIFO within a version
            ordered = sorted(self._groups, key=lambda g: g.min_version)
        else:
            urgent = sorted((g for g in self._groups if g.min_version <= min_version), key=lambda g: g.min_version)
            rest = sorted((g for g in self._groups if g.min_version > min_version), key=lambda g: -prio[id(g)])
            ordered = urgent + rest
        return ordered, np.array([prio[id(g)] for g in ordered])
