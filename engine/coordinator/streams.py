"""Stream assembly: responses arrive in chunks and are assembled as they stream (engine/coordinator/buffer.py Sample).

consumes: ResponseChunk (rollout workers)   produces: a ScoreRequest for each response that finished
A chunk from a worker that no longer owns its sample (declared dead, or the sample was cancelled) or out of order
is ignored and logged.
"""

from __future__ import annotations

import numpy as np
import structlog

from configs.schema import RolloutConfig
from engine.coordinator.counters import RolloutCounters
from engine.coordinator.dispatch import Dispatcher
from engine.coordinator.evals import Evaluations
from engine.coordinator.inflight import InFlight, sample_key
from transport import ResponseChunk, ScoreRequest

log = structlog.get_logger()


def chunk_routes(msg: ResponseChunk) -> np.ndarray | None:
    """The chunk's routes, or None when it has none (or ones that do not fit its tokens)."""
    routes = msg.routes
    if routes.ndim != 3 or routes.shape[1] == 0:
        return None
    if len(routes) not in (len(msg.token_ids), len(msg.token_ids) - 1 if msg.finish_reason else -1):
        log.warning("rollouts.bad_routes", group_id=msg.group_id, sample_index=msg.sample_index,
                    routes=list(routes.shape), tokens=len(msg.token_ids))
        return None
    return routes


class Streams:
    def __init__(self, rollout: RolloutConfig, inflight: InFlight, dispatch: Dispatcher, evals: Evaluations,
                 counters: RolloutCounters) -> None:
        self._return_routes = rollout.return_routes
        self._inflight, self._dispatch, self._evals, self._counters = inflight, dispatch, evals, counters

    def append(self, peer: str, msg: ResponseChunk) -> ScoreRequest | None:
        """Add a chunk to its sample; the sample's ScoreRequest when this was its last chunk."""
        key = (msg.group_id, msg.sample_index)
        group = self._inflight.groups.get(msg.group_id)
        if group is None or self._inflight.owner.get(key) != peer:  # e.g. from a worker declared dead, or cancelled
            log.info("rollouts.ignored_chunk", group_id=msg.group_id, sample_index=msg.sample_index, peer=peer)
            return None
        sample = group.samples[msg.sample_index]
        if msg.offset != sample.length:
            log.warning("rollouts.chunk_out_of_order", group_id=msg.group_id, sample_index=msg.sample_index,
                        offset=msg.offset, have=sample.length)
            return None
        sample.append(msg.token_ids, msg.behavior_logprobs, msg.token_versions,
                      chunk_routes(msg) if self._return_routes and group.temperature > 0 else None)
        if msg.prompt_routes.size and group.prompt_routes is None:
            group.prompt_routes = msg.prompt_routes
        self._counters.generated_tokens += len(msg.token_ids)
        if not msg.finish_reason:
            return None
        self._dispatch.disown(key)
        sample.finish_reason = msg.finish_reason
        sample.flush()
        if msg.group_id not in self._evals:  # RL samples (the budget), also counted by worker
            self._counters.finished_sample(peer)
        return ScoreRequest(sample_key=sample_key(*key), token_ids=sample.token_ids, answer=group.answer)
