"""Plain in-flight state of the producer: the groups being generated or scored, and who generates each sample.

No I/O. A group is in flight from admission until it goes to the buffer (or to its eval's future); a sample is
owned by a worker from dispatch until its last chunk arrives, it is cancelled, or its worker is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.coordinator.buffer import Group, Sample

SampleKey = tuple[str, int]  # (group_id, sample_index)


def sample_key(group_id: str, index: int) -> str:
    """The wire form of a sample's key (ScoreRequest.sample_key, CancelRequest.sample_keys)."""
    return f"{group_id}/{index}"


@dataclass
class InFlight:
    groups: dict[str, Group] = field(default_factory=dict)  # group_id -> group being generated or scored
    owner: dict[SampleKey, str] = field(default_factory=dict)  # (group_id, sample_index) -> worker generating it

    @property
    def num_generating(self) -> int:
        return len(self.owner)

    def add(self, group_id: str, *, prompt_id: int, prompt_ids: list[int], answer: str, num_samples: int,
            temperature: float, source: str) -> Group:
        g = Group(group_id=group_id, prompt_id=prompt_id, prompt_ids=np.asarray(prompt_ids, dtype=np.int32),
                  answer=answer, num_samples=num_samples, temperature=temperature, source=source)
        self.groups[group_id] = g
        return g

    def scored_sample(self, key: str) -> tuple[Group, Sample] | None:
        """The group and sample a score answers, while that sample is finished and still unscored."""
        group_id, _, index = key.rpartition("/")
        group = self.groups.get(group_id)
        sample = group.samples.get(int(index)) if group is not None and index.isdigit() else None
        if sample is None or not sample.finished or sample.reward is not None:  # e.g. regenerated meanwhile
            return None
        return group, sample

    def owned_by(self, worker: str) -> list[SampleKey]:
        return [k for k, w in self.owner.items() if w == worker]
