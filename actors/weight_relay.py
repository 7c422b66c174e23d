"""The weight relay's receiving side (``rollout.weight_sync=relay``): a rollout worker pulls each new policy file over
its coordinator connection into a folder of its own, so no shared filesystem is needed.

consumes: WeightsOffer, WeightsChunk (coordinator, engine/coordinator/relay.py)   produces: FetchWeights
hands on: ``LoadWeights(version, <local path>, digest)`` once the whole file is written and its digest matches;
          the worker then loads it through the backend's ``load(path, digest)`` exactly as a file on shared storage

Flow control is request-driven: at most ``window`` chunks are asked for at a time, so a slow worker is never
flooded, and the coordinator keeps nothing per worker. Chunks are accepted strictly in order and each is checked
before it is written: index (``duplicate``, ``out_of_order``: the one expected was lost or overtaken), offset,
length (``truncated``/``oversized``) and crc32 (``corrupted``). A refused chunk is logged (``weights.chunk_refused``
with the reason) and everything from the expected index on is asked for again under a new ``attempt`` number, so
answers to the abandoned requests are told apart and dropped; a chunk not answered within ``chunk_timeout_s`` counts
as ``lost`` the same way. The sha256 of the accepted bytes is computed while writing; a whole file that does not
match the offer's digest (``weights.relay_digest_mismatch``) is deleted and fetched again from its first chunk, up
to ``attempts`` times. Then the version is refused (``weights.relay_refused``): the worker keeps serving the
version it has and the transfer starts again after ``reask_s`` unless a newer offer came. A newer offer cancels an
unfinished transfer (``weights.relay_superseded``). Until a file is complete and verified the backend never sees
it, so a worker never generates with a mix of two versions.

Files live in ``<local dir>/<peer id>/policy_v{k}.safetensors`` (a ``.part`` suffix while written); ``local_dir``
None = a fresh temp folder. Older versions are deleted once a newer one has loaded (``loaded``); the worker's
folder is removed when it stops (``close``).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from transport import FetchWeights, LoadWeights, PeerLost, WeightsChunk, WeightsOffer

log = structlog.get_logger()

_MAX_RETRIES = 8  # re-requests in a row without an accepted chunk before the transfer attempt counts as failed


class RelayReceiver:
    def __init__(self, send: Callable[[FetchWeights], Awaitable[None]], *, name: str, local_dir: str | None,
                 on_ready: Callable[[LoadWeights], None], on_refused: Callable[[WeightsOffer], Awaitable[None]],
                 attempts: int = 4, window: int = 4, chunk_timeout_s: float = 10.0, reask_s: float = 30.0) -> None:
        self._send, self._name, self._local_dir = send, name, local_dir
        self._on_ready, self._on_refused = on_ready, on_refused
        self._attempts, self._window = max(attempts, 1), max(window, 1)
        self._chunk_timeout_s, self._reask_s = chunk_timeout_s, reask_s
        self._folder: Path | None = None
        self._offer: WeightsOffer | None = None  # the newest offer seen
        self._task: asyncio.Task | None = None  # its transfer, while it runs
        self._chunks: asyncio.Queue[WeightsChunk] = asyncio.Queue()
        self._attempt = 0  # request generation: bumped on every re-request from an index
        self._reask: asyncio.TimerHandle | None = None
        self.refused_chunks = 0

    # ---- inputs from the worker's receive loop ----------------------------------------------------------------

    def offer(self, msg: WeightsOffer) -> None:
        if self._offer is not None and msg.version <= self._offer.version:
            return  # already fetching or fetched
        if self._task is not None and not self._task.done():
            log.warning("weights.relay_superseded", version=self._offer.version, newer=msg.version)
            self._task.cancel()
        self._offer = msg
        self._start(msg)

    def chunk(self, msg: WeightsChunk) -> None:
        if self._task is not None and not self._task.done() and msg.version == self._offer.version:
            self._chunks.put_nowait(msg)  # bounded: chunks come only as answers to our (windowed) requests

    # ---- files --------------------------------------------------------------------------------------------------

    def path(self, version: int) -> Path:
        return self._dir() / f"policy_v{version}.safetensors"

    def loaded(self, version: int) -> None:
        """``version`` serves now: delete every older relayed file."""
        if self._folder is None:
            return
        for f in self._folder.glob("policy_v*.safetensors*"):
            v = f.name.removeprefix("policy_v").split(".")[0]
            if v.isdigit() and int(v) < version:
                f.unlink(missing_ok=True)

    def close(self) -> None:
        if self._reask is not None:
            self._reask.cancel()
        if self._task is not None:
            self._task.cancel()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def _dir(self) -> Path:
        if self._folder is None:
            if self._local_dir:
                self._folder = Path(self._local_dir) / self._name
                self._folder.mkdir(parents=True, exist_ok=True)
            else:
                self._folder = Path(tempfile.mkdtemp(prefix=f"everyprompt-{self._name}-"))
        return self._folder

    # ---- the transfer -------------------------------------------------------------------------------------------

    def _start(self, offer: WeightsOffer) -> None:
        while not self._chunks.empty():  # another version's answers
            self._chunks.get_nowait()
        self._task = asyncio.get_running_loop().create_task(self._fetch(offer), name=f"relay.v{offer.version}")

    async def _fetch(self, offer: WeightsOffer) -> None:
        final = self.path(offer.version)
        part = final.with_name(final.name + ".part")
        try:
            for attempt in range(1, self._attempts + 1):
                if (reason := await self._transfer(offer, part)) is None:
                    part.replace(final)
                    log.info("weights.relay_complete", version=offer.version, path=str(final), bytes=offer.num_bytes,
                             digest=offer.digest, attempt=attempt)
                    self._on_ready(LoadWeights(version=offer.version, path=str(final), digest=offer.digest))
                    return
                log.warning("weights.relay_failed", version=offer.version, reason=reason, attempt=attempt,
                            attempts=self._attempts)
            log.error("weights.relay_refused", version=offer.version, reason=reason, attempts=self._attempts,
                      retry_in_s=self._reask_s)
            self._reask = asyncio.get_running_loop().call_later(self._reask_s, self._again, offer)
            await self._on_refused(offer)
        except PeerLost:
            return  # the worker's receive loop ends with the same error
        finally:
            part.unlink(missing_ok=True)

    def _again(self, offer: WeightsOffer) -> None:
        self._reask = None
        if self._offer is offer:  # no newer version came meanwhile
            self._start(offer)

    async def _transfer(self, offer: WeightsOffer, part: Path) -> str | None:
        """One pass over the whole file into ``part`` -> None when its digest matches, else why not."""
        algorithm, _, _ = offer.digest.partition(":")
        if algorithm not in hashlib.algorithms_guaranteed:
            return f"unsupported digest {offer.digest!r:.80}"
        h, size, step = hashlib.new(algorithm), offer.num_bytes, offer.chunk_bytes
        num_chunks = -(-size // step)
        index = asked = retries = 0
        self._attempt += 1
        try:
            with open(part, "wb") as f:
                while index < num_chunks:
                    while asked < min(index + self._window, num_chunks):
                        await self._send(FetchWeights(version=offer.version, index=asked, attempt=self._attempt))
                        asked += 1
                    try:
                        c = await asyncio.wait_for(self._chunks.get(), self._chunk_timeout_s)
                    except TimeoutError:
                        c, problem = None, "lost"
                    else:
                        if c.attempt != self._attempt:
                            continue  # the answer to a request given up on
                        problem = _check(c, index, step, size)
                    if problem is None:
                        f.write(c.data)
                        h.update(c.data)
                        index, retries = index + 1, 0
                        continue
                    self.refused_chunks += 1
                    retries += 1
                    log.warning("weights.chunk_refused", version=offer.version, expected=index,
                                index=c.index if c is not None else index, reason=problem, retries=retries)
                    if retries > _MAX_RETRIES:
                        return f"{problem} ({retries} re-requests in a row without progress)"
                    if problem != "duplicate":  # nothing is missing after a duplicate: keep the requests out
                        self._attempt += 1
                        asked = index
        except OSError as e:  # the worker's own disk: full, read-only, gone
            log.error("weights.relay_write_failed", version=offer.version, path=str(part), error=str(e))
            return f"write_failed: {e}"
        got = f"{algorithm}:{h.hexdigest()}"
        if got != offer.digest:
            log.warning("weights.relay_digest_mismatch", version=offer.version, expected=offer.digest, got=got,
                        bytes=size)
            return "digest_mismatch"
        return None


def _check(c: WeightsChunk, index: int, step: int, size: int) -> str | None:
    """Why chunk ``c`` cannot be the next one (``index``) of a file of ``size`` bytes in chunks of ``step``."""
    if c.index != index:
        return "duplicate" if c.index < index else "out_of_order"
    want = min(step, size - index * step)
    if c.offset != index * step:
        return "bad_offset"
    if len(c.data) != want:
        return "truncated" if len(c.data) < want else "oversized"
    if zlib.crc32(c.data) != c.crc32:
        return "corrupted"
    return None
