"""The path of a finished response to its reward worker: post-processing pool and reward overlap (B.6).

``rollout.postprocess_workers`` = P > 0 puts a pool of P threads in front of scoring: each finished response is
detokenized and post-processed (``work(token_ids)``) in the pool, then its ScoreRequest goes out. P = 1 is the
serial baseline of the ablation; P = 0 sends the request at once (the default run).

``rollout.reward_overlap`` = true (default) starts that path as soon as each response finishes, overlapped with
generation. false is the baseline "score after the batch": finished responses wait until no RL response is being
generated (the generation wave drained) or a whole step's worth (``hold_limit``) has finished.

consumes: finished ScoreRequests (engine/coordinator/scoring.py)   produces: the same requests, through ``send``
waits for: a pool thread (bounded by P)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import structlog

from transport import ScoreRequest

log = structlog.get_logger()


class ScorePath:
    def __init__(self, send: Callable[[ScoreRequest], Awaitable[None]], *, workers: int = 0, overlap: bool = True,
                 work: Callable[[np.ndarray], object] | None = None, hold_limit: int = 0) -> None:
        self._send, self._overlap, self._work, self._hold_limit = send, overlap, work, hold_limit
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="postprocess") if workers else None
        self._held: list[ScoreRequest] = []
        self._tasks: set[asyncio.Task] = set()

    async def finished(self, req: ScoreRequest, *, generating: int) -> None:
        """A response finished; ``generating`` RL responses are still being generated."""
        if not self._overlap:
            self._held.append(req)
            if generating and len(self._held) < max(self._hold_limit, 1):
                return
            held, self._held = self._held, []
            for r in held:
                await self._start(r)
            return
        await self._start(req)

    async def _start(self, req: ScoreRequest) -> None:
        if self._pool is None:
            await self._send(req)
            return
        task = asyncio.create_task(self._process(req), name="postprocess")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def _process(self, req: ScoreRequest) -> None:
        if self._work is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._work, req.token_ids)
        await self._send(req)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("postprocess.failed", error=repr(task.exception()))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
