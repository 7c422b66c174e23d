"""Rollout worker membership and weights: who is alive, which policy version each one runs, how idle it was.

consumes: WeightsLoaded (rollout workers)   produces: LoadWeights (to every live worker, and to each one joining);
with ``relay`` (rollout.weight_sync=relay) a WeightsOffer instead, whose chunks engine/coordinator/relay.py serves
waits for: every worker on a version (``wait_weights``, before an eval)
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import structlog

from engine.coordinator.relay import WeightRelay
from transport import Hub, LoadWeights, WeightsLoaded, WeightsOffer

log = structlog.get_logger()


class RolloutWorkers:
    def __init__(self, hub: Hub, peers: list[str], relay: WeightRelay | None = None) -> None:
        self._hub, self.relay = hub, relay
        self.peers = list(peers)  # live rollout workers, in the order they joined
        self.versions: dict[str, int] = {w: 0 for w in peers}  # peer -> newest weights it loaded
        self._time: dict[str, tuple[float, float]] = {}  # peer -> (idle, paused) fractions, last interval
        self._clock: dict[str, tuple[float, float, float]] = {}  # peer -> (when, idle_s, paused_s) reported
        self._changed = asyncio.Event()
        self._latest: LoadWeights | WeightsOffer | None = None

    async def broadcast(self, msg: LoadWeights) -> None:
        """New weights to every worker; each swaps them in between two decode steps (no waiting here)."""
        if self.relay is not None and (msg := await self.relay.publish(msg)) is None:
            return  # unreadable (logged): the workers keep the previous offer
        for w in self.peers:
            await self._hub.send(w, msg)
        self._latest = msg

    async def join(self, peer: str) -> None:
        """A (re)started worker: bring it to the newest weights."""
        self.peers.append(peer)
        self.versions[peer] = 0
        self._changed.set()  # wait_weights with no worker yet (rollout.num_workers=0) can go on
        if self._latest is not None:
            await self._hub.send(peer, self._latest)

    def leave(self, peer: str) -> None:
        self.peers.remove(peer)
        self.versions.pop(peer, None)
        self._time.pop(peer, None)
        self._clock.pop(peer, None)
        self._changed.set()

    def loaded(self, peer: str, msg: WeightsLoaded) -> None:
        """``peer`` applied ``msg.version``. A report from a worker that already left is ignored: the hub may have
        queued it before the worker was declared lost, and counting it would bring back a worker that no longer
        exists, whose old version ``wait_weights`` (every eval) would then wait for forever."""
        if peer not in self.versions:
            log.info("rollouts.ignored_weights_loaded", peer=peer, version=msg.version)
            return
        self.versions[peer] = max(self.versions[peer], msg.version)
        now, last = time.monotonic(), self._clock.get(peer)
        if last is not None and now > last[0]:  # fractions over the interval since this worker's last report
            span = now - last[0]
            self._time[peer] = (min((msg.idle_s - last[1]) / span, 1.0), min((msg.paused_s - last[2]) / span, 1.0))
        self._clock[peer] = (now, msg.idle_s, msg.paused_s)
        self._changed.set()

    async def wait_weights(self, version: int) -> None:
        while not self.versions or min(self.versions.values()) < version:
            self._changed.clear()
            await self._changed.wait()

    def idle(self) -> dict[str, float]:
        """Mean over rollout workers of the fraction of time they had nothing to decode (waiting for work or
        weights) and were paused loading weights, over each one's last interval between weight updates."""
        fracs = list(self._time.values())
        if not fracs:
            return {}
        return {"gen_idle_frac": float(np.mean([f[0] for f in fracs])),
                "gen_paused_frac": float(np.mean([f[1] for f in fracs]))}

    def clocks(self) -> dict[str, tuple[float, float, float]]:
        """peer -> (when, idle_s, paused_s) of each rollout worker's newest report (cumulative totals)."""
        return dict(self._clock)
