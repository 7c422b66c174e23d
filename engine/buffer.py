"""Finished groups waiting for the learner, and the records they are made of.

The buffer serves the oldest policy version first (FIFO within a version) for now and enforces the staleness
bound: ``take`` never returns a group holding a token older than ``min_version``; such groups are counted as discarded (the admission control in engine/loop.py keeps
this at zero in steady state).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One response of a group, as it came back from a rollout worker and a reward worker."""

    sample_index: int
    token_ids: np.ndarray  # int32 [T]
    behavior_logprobs: np.ndarray  # float32 [T]
    token_versions: np.ndarray  # int32 [T]
    finish_reason: str
    routes: np.ndarray | None = None  # [T - 1, layers, k] MoE routes, None when not recorded
    reward: float | None = None  # None until scored
    valid: bool = False
    reward_parts: dict[str, float] = field(default_factory=dict)

    @property
    def min_version(self) -> int:
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

    @property
    def complete(self) -> bool:
        return len(self.samples) == self.num_samples and all(s.reward is not None for s in self.samples.values())

    @property
    def min_version(self) -> int:
        return min(s.min_version for s in self.samples.values())

    def ordered(self) -> list[Sample]:
        return [self.samples[i] for i in range(self.num_samples)]


class GroupBuffer:
    """consumes: complete groups (rollout + reward)   produces: lists of groups (learner)   blocks on: take()"""

    def __init__(self, on_discard=None) -> None:
        self._on_discard = on_discard  # called after stale groups were dropped (admission replaces them)
        self._groups: deque[Group] = deque()
        self._changed = asyncio.Event()
        self.num_discarded_stale = 0

    def __len__(self) -> int:
        return len(self._groups)

    def put(self, group: Group) -> None:
        self._groups.append(group)
        self._changed.set()

    async def take(self, n: int, *, min_version: int) -> list[Group]:
        """Wait for ``n`` groups whose every token is at least ``min_version``; drop staler ones (counted)."""
        while True:
            fresh = [g for g in self._groups if g.min_version >= min_version]
            if len(fresh) < len(self._groups):
                self.num_discarded_stale += len(self._groups) - len(fresh)
                self._groups = deque(fresh)
                if self._on_discard is not None:
                    self._on_discard()
            if len(self._groups) >= n:  # oldest policy first, so nothing ages past the bound while waiting
                ordered = sorted(self._groups, key=lambda g: g.min_version)
                self._groups = deque(ordered[n:])
                return ordered[:n]
            self._changed.clear()
            await self._changed.wait()
