"""The producer's inbox: every message for it, in the order the pump (engine/coordinator/cluster.py) received them.

The pump only routes; engine/coordinator/loop.py::continuous_rollouts takes them one at a time. Besides the wire
messages (ResponseChunk, Scored, Judged, WeightsLoaded) it carries the membership changes the pump sees.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal

Role = Literal["rollout", "reward"]


@dataclass(frozen=True)
class WorkerJoined:
    """A (re)started worker said Hello, or one started by hand joined (everyprompt-rollout-worker)."""

    role: Role


@dataclass(frozen=True)
class WorkerLost:
    """A worker died or went silent; the supervisor restarted it (or dropped one that joined on its own)."""

    role: Role


class Inbox:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()

    def put(self, peer: str, msg: object) -> None:
        self._queue.put_nowait((peer, msg))

    async def get(self) -> tuple[str, object]:
        """The next (peer, message)."""
        return await self._queue.get()
