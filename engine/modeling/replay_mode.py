"""MoE router replay modes (ALGORITHMS.md B.4), torch-free: the one list ``learner.router_replay`` is checked against.

- ``R3``: the learner replays the experts the rollout chose (recorded at generation, carried in TrainBatch.routes).
- ``R2``: the learner replays its own old-policy-pass experts across the batch's mini-batch updates.
- ``off``: the learner routes by itself.
"""

from __future__ import annotations

from enum import Enum


class ReplayMode(str, Enum):
    OFF = "off"
    R2 = "R2"
    R3 = "R3"


REPLAY_MODES: tuple[str, ...] = tuple(m.value for m in ReplayMode)
