"""The weight relay's sending side (``rollout.weight_sync=relay``): policy files to workers with no shared filesystem.

consumes: LoadWeights (the trainer, through workers.py), FetchWeights (rollout workers)
produces: WeightsOffer (to every worker, and to each one joining), WeightsChunk (one per FetchWeights)
waits for: nothing (a chunk is one ``os.pread`` of a file the page cache usually holds)

The coordinator opens the learner's published file once per version, hashes it there when the learner sent no digest
(a resume's checkpoint weights), and offers ``(version, digest, size, chunk size)``. Each worker then pulls chunks
(actors/weight_relay.py): the sender keeps no per-worker state, so a dead worker's transfer is simply never asked for
again, a slow worker gets only what it asked for, and memory stays at the chunks queued on the sockets. Only the
newest version is served: a worker still pulling an older one has the newer offer queued before any answer.

``tamper`` is the fault-injection seam the tests use (tests/actors/test_weight_relay.py): given the chunk about to
go out it returns the chunks to send instead (none = lost, two = duplicated, altered bytes = corrupted, held back and
sent later = reordered). The run leaves it None.
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from engine.backends.weights_file import digest_fd
from transport import FetchWeights, Hub, LoadWeights, WeightsChunk, WeightsOffer

log = structlog.get_logger()


@dataclass
class _Published:
    offer: WeightsOffer
    fd: int  # kept open: a later rename over the path (the learner's next save) does not change what we serve


class WeightRelay:
    def __init__(self, hub: Hub, *, chunk_bytes: int) -> None:
        self._hub, self._chunk_bytes = hub, chunk_bytes
        self._current: _Published | None = None
        self.tamper: Callable[[WeightsChunk], list[WeightsChunk]] | None = None
        self.chunks_sent = 0

    async def publish(self, msg: LoadWeights) -> WeightsOffer | None:
        """Open ``msg.path`` and make it the version served -> the offer to send to every worker; None (logged) when
        the file cannot be read: the workers keep the previous offer, and the next version supersedes it."""
        try:
            fd = os.open(msg.path, os.O_RDONLY)
        except OSError as e:
            log.error("weights.relay_unreadable", version=msg.version, path=msg.path, error=str(e))
            return None
        size = os.fstat(fd).st_size
        digest = msg.digest or await asyncio.to_thread(digest_fd, fd)
        offer = WeightsOffer(version=msg.version, digest=digest, num_bytes=size, chunk_bytes=self._chunk_bytes)
        self.close()
        self._current = _Published(offer, fd)
        log.info("weights.relay_offered", version=msg.version, bytes=size,
                 chunks=-(-size // self._chunk_bytes), digest=digest)
        return offer

    async def serve(self, peer: str, req: FetchWeights) -> None:
        """Answer one chunk request; requests for another version, or out of range, are dropped (logged)."""
        cur = self._current
        if cur is None or req.version != cur.offer.version:
            log.debug("weights.relay_stale_request", peer=peer, version=req.version,
                      serving=cur.offer.version if cur else None)
            return
        offset = req.index * self._chunk_bytes
        if req.index < 0 or offset >= cur.offer.num_bytes:
            log.warning("weights.relay_bad_request", peer=peer, version=req.version, index=req.index)
            return
        data = os.pread(cur.fd, min(self._chunk_bytes, cur.offer.num_bytes - offset), offset)
        chunk = WeightsChunk(version=req.version, index=req.index, offset=offset,
                             data=np.frombuffer(data, dtype=np.uint8), crc32=zlib.crc32(data), attempt=req.attempt)
        for c in self.tamper(chunk) if self.tamper is not None else [chunk]:
            if not await self._hub.send(peer, c):  # the worker is gone: its transfer ends here
                return
            self.chunks_sent += 1

    def close(self) -> None:
        if self._current is not None:
            os.close(self._current.fd)
            self._current = None
