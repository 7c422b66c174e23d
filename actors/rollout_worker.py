"""Rollout worker: continuous batched decoding that streams every response in chunks and takes new weights in flight.

consumes: GenerateRequest, ContinueRequest, CancelRequest, LoadWeights, Shutdown (coordinator)
produces: ResponseChunk (every ``rollout.chunk_tokens`` tokens of each response: tokens, behaviour log-probs, the
          policy version of every token and, when asked, MoE routes; a group's prompt routes ride on its first
          chunk), WeightsLoaded (with idle and paused time)
blocks on: decode steps, run in a thread so heartbeats keep flowing

The batch never drains to take work or weights. Between chunks the worker (1) drops cancelled groups, (2) applies
the newest weights if any arrived (the decode loop also stops early for them, so a pause lasts at most one decode
step plus the load), then either keeps the KV cache or recomputes it under the new weights
(``rollout.kv_on_update``), and (3) admits queued requests while the batch holds fewer than
``rollout.max_batch_samples`` unfinished responses. A response can therefore span several policy versions;
each token records the one that sampled it. ``LoadWeights`` names a safetensors file the learner wrote atomically,
and the worker swaps it in between two decode steps. With ``rollout.weight_sync=relay`` (no shared filesystem) the
coordinator sends ``WeightsOffer`` instead: the worker pulls the file over this socket into its own folder
(``--local-dir``; actors/weight_relay.py) while it keeps decoding, and swaps it in the same way once it is complete
and its digest matches.

Weight integrity: the backend reads the file once, checks its bytes against ``LoadWeights.digest`` and loads from
those bytes (engine/backends/weights_file.py). A file that fails (``weights.digest_mismatch``, missing, torn) is
read again up to ``load_attempts`` times, with a doubling wait that ends early when the file is replaced; then it
is refused (``weights.load_refused``): the model is untouched, the worker keeps serving its previous version,
reports it with ``WeightsLoaded(version=<the one it serves>)``, and tries the same file again every ``reask_s``
until a newer version supersedes it. Tokens always carry the version of the weights that sampled them.

Generation is the backend's (``rollout.backend``: engine/backends/registry.py picks it, engine/backends/base.py
declares what the worker calls): the worker only admits rows, steps the batch, and streams what the rows hold.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque

import numpy as np
import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from actors.weight_relay import RelayReceiver
from engine.backends.base import RolloutBackend
from engine.backends.registry import build_rollout
from engine.backends.weights_file import WeightsRejected, file_state
from engine.modeling.rows import Row
from transport import (CancelRequest, ContinueRequest, DropWeightGroup, GenerateRequest, LoadWeights, Peer,
                       ResponseChunk, Shutdown, WeightsChunk, WeightsLoaded, WeightsOffer, WeightsSending,
                       WeightsWanted)

log = structlog.get_logger()


class RolloutWorker:
    def __init__(self, peer: Peer, backend: RolloutBackend, *, worker_id: int, max_batch_samples: int,
                 chunk_tokens: int = 4, kv_on_update: str = "recompute", capture_routes: bool = True,
                 load_attempts: int = 4, load_backoff_s: float = 0.25, reask_s: float = 30.0,
                 relay_dir: str | None = None, weight_sync: str = "disk") -> None:
        self._peer, self._backend = peer, backend
        self._worker_id, self._max_batch_samples = worker_id, max_batch_samples
        self._chunk_tokens, self._kv_on_update = chunk_tokens, kv_on_update
        self._capture_routes = capture_routes
        self._load_attempts, self._load_backoff_s, self._reask_s = max(load_attempts, 1), load_backoff_s, reask_s
        self._reask: asyncio.TimerHandle | None = None  # the refused weights, asked for again later
        self._batch = backend.new_batch(capture_routes=capture_routes)
        self._queue: deque[list[Row]] = deque()  # requests not yet in the batch, as rows
        self._cancelled: dict[int, Row] = {}  # id -> batch row to drop (the rows, not their keys: a key may be
        # cancelled and sent again at once, and the new request must survive the old one's cancel)
        self._weights: LoadWeights | None = None  # newest weights not yet applied
        self._distributed = weight_sync == "distributed"  # weights broadcast by the learner (_want, _receive)
        self._newest: LoadWeights | None = None  # distributed: the newest LoadWeights (its file: the repair copy)
        self._asked = False  # distributed: a WeightsWanted is out, not answered yet
        self._sending: WeightsSending | None = None  # distributed: the broadcast to receive now
        self._relay = RelayReceiver(peer.send, name=peer.peer_id, local_dir=relay_dir, on_ready=self._take_weights,
                                    on_refused=self._relay_refused, attempts=load_attempts, reask_s=reask_s)
        self._wake = asyncio.Event()
        self.version = 0
        self._idle_s = self._paused_s = 0.0
        self._finished = 0  # responses completed

    async def serve(self) -> None:
        await self._peer.start()
        try:
            async with asyncio.TaskGroup() as tg:
                gen = tg.create_task(self._generate_loop())
                await self._receive_loop()  # returns on Shutdown
                gen.cancel()
        finally:
            if self._reask is not None:
                self._reask.cancel()
            self._relay.close()
            log.info("rollout.done", generated_samples=self._finished, version=self.version)
            await self._peer.close()

    async def _receive_loop(self) -> None:
        while True:
            msg = await self._peer.recv()
            match msg:
                case GenerateRequest():
                    self._queue.append([_row(msg, k, msg.prompt_ids.tolist(), []) for k in range(msg.num_samples)])
                case ContinueRequest():
                    self._queue.append([_row(msg, msg.sample_index, msg.prompt_ids.tolist(), msg.prefix.tolist())])
                case CancelRequest():
                    gone = set(msg.sample_keys)
                    self._queue = deque(kept for rows in self._queue
                                        if (kept := [r for r in rows if f"{r.key[0]}/{r.key[1]}" not in gone]))
                    self._cancelled.update({id(r): r for r in self._batch.rows if f"{r.key[0]}/{r.key[1]}" in gone})
                case LoadWeights() if self._distributed:
                    await self._want(msg)
                case LoadWeights():
                    self._take_weights(msg)
                case WeightsSending():  # rollout.weight_sync=distributed: the learner is broadcasting now
                    self._sending, self._asked = msg, False
                case WeightsOffer():  # rollout.weight_sync=relay: pulled while decoding goes on, then LoadWeights
                    self._relay.offer(msg)
                    continue
                case WeightsChunk():
                    self._relay.chunk(msg)
                    continue
                case Shutdown():
                    return
                case _:
                    log.warning("rollout.unexpected_message", type=type(msg).__name__)
                    continue
            self._wake.set()

    async def _generate_loop(self) -> None:
        while True:
            if not (self._batch.active or self._queue or self._weights or self._cancelled or self._sending):
                t0 = time.monotonic()
                await self._wake.wait()
                self._idle_s += time.monotonic() - t0
            self._wake.clear()
            self._drop_cancelled()
            if self._weights is not None:
                await self._apply_weights()
            if self._sending is not None:
                await self._receive_weights()
            self._admit()
            if self._batch.active:
                try:
                    await self._backend.run_decode(self._decode_chunk)
                except Exception as e:
                    await self._backend_failed(e)
                    raise
            await self._emit()

    def _take_weights(self, msg: LoadWeights) -> None:
        if self._weights is None or msg.version > self._weights.version:
            self._weights = msg
            self._wake.set()

    async def _relay_refused(self, offer: WeightsOffer) -> None:
        """A relayed version failed every attempt: report the version still served, as a refused file does."""
        await self._report_weights(0.0)

    async def _report_weights(self, load_s: float) -> None:
        await self._peer.send(WeightsLoaded(version=self.version, worker_id=self._worker_id, load_s=load_s,
                                            idle_s=self._idle_s, paused_s=self._paused_s))

    async def _backend_failed(self, error: Exception) -> None:
        """The backend cannot go on (e.g. a lost sglang server it did not launch): log one line, send every token
        it holds that is ready (the coordinator continues each response elsewhere from what it received), and let
        the error end this process, whose restart is the coordinator's."""
        log.error("rollout.backend_failed", error=str(error).splitlines()[0][:500] if str(error) else repr(error),
                  type=type(error).__name__)
        try:
            for r in self._batch.rows:
                await self._emit_row(r, flush=True)
            await asyncio.sleep(_FLUSH_GRACE_S)  # the socket drops unsent frames when it closes (linger 0)
        except Exception as e:  # noqa: BLE001 - the first error is the one to report
            log.warning("rollout.flush_failed", error=repr(e))

    def _admit(self) -> None:
        """Fill free batch slots from the queue in order. A group may be split over two admissions when it does not
        fit whole: its samples still run on this worker (prefix reuse), and no slot waits for a whole group."""
        while self._queue and self._batch.active < self._max_batch_samples:
            rows, room = self._queue[0], self._max_batch_samples - self._batch.active
            self._batch.add(rows[:room])
            if room >= len(rows):
                self._queue.popleft()
            else:
                self._queue[0] = rows[room:]

    def _decode_chunk(self) -> None:
        """Up to ``chunk_tokens`` decode steps (all the way with 0); stop early when new weights arrive, or when a
        response finished and queued work can take its slot."""
        steps = 0
        while self._batch.active and (self._chunk_tokens <= 0 or steps < self._chunk_tokens):
            active = self._batch.active
            self._batch.step(self.version)
            steps += 1
            if self._weights is not None or self._sending is not None or (self._queue and self._batch.active < active):
                break

    async def _apply_weights(self) -> None:
        msg, self._weights, t0 = self._weights, None, time.monotonic()
        if await self._load_verified(msg):
            if self._kv_on_update == "recompute":
                self._batch.invalidate()  # the next step re-prefills every unfinished response under the new weights
            self.version = msg.version
            self._relay.loaded(msg.version)  # older relayed files go
        load_s = time.monotonic() - t0
        self._paused_s += load_s
        await self._report_weights(load_s)

    async def _load_verified(self, msg: LoadWeights) -> bool:
        """Load ``msg``'s weights, reading the file again after a failed check (bounded, doubling waits that end
        when the file is replaced) -> True once loaded; False: refused (or superseded by newer weights while
        waiting), the model untouched."""
        wait, error = self._load_backoff_s, None
        for attempt in range(1, self._load_attempts + 1):
            seen = file_state(msg.path)
            try:
                await self._backend.load_async(msg.path, msg.digest)
                return True
            except WeightsRejected as e:
                error = e
            if self._weights is not None and self._weights.version > msg.version:  # take those instead
                log.warning("weights.superseded", version=msg.version, newer=self._weights.version, reason=error.reason)
                return False
            if attempt < self._load_attempts:
                await _replaced(msg.path, seen, wait)
                wait *= 2
        log.error("weights.load_refused", version=msg.version, path=msg.path, reason=error.reason,
                  attempts=self._load_attempts, serving=self.version, error=str(error))
        self._ask_again(msg)
        return False

    async def _want(self, msg: LoadWeights | None) -> None:
        """rollout.weight_sync=distributed: ask learner rank 0 for the broadcast of the newest weights (one request
        at a time; the answer names its version, the newest the learner holds) while generation goes on."""
        if msg is not None and (self._newest is None or msg.version > self._newest.version):
            self._newest = msg
        if self._newest is None or self._newest.version <= self.version or self._asked or self._sending:
            return
        group, world_size = self._backend.weight_group()
        self._asked = True
        await self._peer.send(WeightsWanted(group_name=group, world_size=world_size, version=self._newest.version,
                                            worker_id=self._worker_id))

    async def _receive_weights(self) -> None:
        """Take the broadcast the learner announced (engine/backends/sglang_sync.py): the backend pauses, loads every
        bucket and continues. Refused: the previous version is kept and reported, the group dropped, and the
        newest weights asked for again in ``reask_s``."""
        sending, self._sending, t0 = self._sending, None, time.monotonic()
        repair = self._newest if self._newest is not None and self._newest.version == sending.version else None
        try:
            await asyncio.to_thread(self._backend.load_distributed, sending, repair.path if repair else "",
                                    repair.digest if repair else "")
            if self._kv_on_update == "recompute":
                self._batch.invalidate()
            self.version = sending.version
        except WeightsRejected as e:
            log.error("weights.load_refused", version=sending.version, reason=e.reason, serving=self.version,
                      error=str(e))
            await self._peer.send(DropWeightGroup(group_name=await asyncio.to_thread(self._backend.abandon_group)))
            asyncio.get_running_loop().call_later(self._reask_s, lambda: asyncio.ensure_future(self._want(None)))
        self._paused_s += time.monotonic() - t0
        await self._report_weights(time.monotonic() - t0)
        await self._want(None)  # newer weights announced meanwhile

    def _ask_again(self, msg: LoadWeights) -> None:
        """In ``reask_s``, try refused weights again unless newer ones came (a file fixed later is taken)."""
        def again() -> None:
            self._reask = None
            if msg.version > self.version and (self._weights is None or self._weights.version < msg.version):
                self._weights = msg
                self._wake.set()

        if self._reask is not None:
            self._reask.cancel()
        self._reask = asyncio.get_running_loop().call_later(self._reask_s, again)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        gone, self._cancelled = self._cancelled, {}
        self._batch.remove([r for r in self._batch.rows if id(r) in gone])

    async def _emit(self) -> None:
        """Send each response's ready tokens (fed, so their routes are known; or final) in chunks of
        ``chunk_tokens`` (0: the whole response at once); the last chunk carries the rest."""
        finished = []
        for r in self._batch.rows:
            if await self._emit_row(r):
                finished.append(r)
        self._finished += len(finished)
        self._batch.remove(finished)

    async def _emit_row(self, r: Row, flush: bool = False) -> bool:
        """Send ``r``'s full chunks, and its last one once it finished (``flush``: also a shorter chunk of the rest
        that is ready); True = it is all sent."""
        while True:
            ready_all = r.ready(self._capture_routes)
            final = r.done and ready_all == len(r.tokens)
            step = self._chunk_tokens if self._chunk_tokens > 0 else len(r.tokens) + 1
            if ready_all - r.emitted >= step:
                ready, final = r.emitted + step, final and r.emitted + step == ready_all
            elif final or (flush and ready_all > r.emitted):
                ready = ready_all
            else:
                return False
            group_id, sample_index, prompt_id, want_routes = r.key
            lo, extra = r.emitted, {}
            if want_routes:
                extra["routes"] = self._backend.stack_routes(r.routes[lo - r.route_base:ready - r.route_base])
                if r.want_prompt_routes and r.prompt_routes is not None:
                    extra["prompt_routes"], r.want_prompt_routes = r.prompt_routes, False
            await self._peer.send(ResponseChunk(
                group_id=group_id, sample_index=sample_index, prompt_id=prompt_id, offset=lo,
                token_ids=np.asarray(r.tokens[lo:ready], dtype=np.int32),
                behavior_logprobs=np.asarray(r.logprobs[lo:ready], dtype=np.float32),
                token_versions=np.asarray(r.versions[lo:ready], dtype=np.int32),
                finish_reason=r.finish_reason if final else "", worker_id=self._worker_id, **extra))
            r.emitted = ready
            if final:
                return True


_FLUSH_GRACE_S = 0.5  # _backend_failed: time for the last chunks to leave before the process exits


async def _replaced(path: str, seen: tuple[int, int, int] | None, timeout_s: float) -> None:
    """Wait until ``path`` changes (a rename over it, or its first appearance) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while file_state(path) == seen and (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(0.02, left))


def _row(req: GenerateRequest | ContinueRequest, sample_index: int, prompt: list[int], prefix: list[int]) -> Row:
    key = (req.group_id, sample_index, req.prompt_id, req.return_routes)
    first = sample_index == 0 if isinstance(req, GenerateRequest) else req.send_prompt_routes
    kw = dict(max_new_tokens=req.max_new_tokens, temperature=req.temperature,
              want_prompt_routes=req.return_routes and first)
    return Row.continuing(key, prompt, prefix, **kw) if prefix else Row(key=key, prompt=prompt, **kw)


def main(argv: list[str] | None = None) -> int:
    p = actor_parser("everyprompt-rollout-worker", __doc__)
    p.add_argument("--init", required=True, help="HF save_pretrained folder with the initial (version 0) policy")
    p.add_argument("--rejoin-s", type=float, default=0.0,
                   help="a worker started by hand: after losing the coordinator (nothing from it for "
                        "transport.peer_timeout_s: a network partition, a learner recovery), join again on a new "
                        "connection, for up to this many seconds without an answer, before exiting with code 3 "
                        "(default 0: exit at once)")
    p.add_argument("--local-dir", default=None,
                   help="rollout.weight_sync=relay: the folder on this machine where relayed weights are written "
                        "(in a subfolder per worker, removed at exit; default: a temporary folder)")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "rollout")
    backend = build_rollout(cfg, args.init, args.worker_id)  # rollout.backend, engine/backends/registry.py
    session, lost_at = 0, None
    while True:
        peer = make_peer(args, cfg, "rollout", session=session)
        worker = RolloutWorker(peer, backend, worker_id=args.worker_id,
                               max_batch_samples=cfg.rollout.max_batch_samples, chunk_tokens=cfg.rollout.chunk_tokens,
                               kv_on_update=cfg.rollout.kv_on_update, capture_routes=cfg.rollout.return_routes,
                               relay_dir=args.local_dir, weight_sync=cfg.rollout.weight_sync)
        code = run_actor(worker.serve(), "rollout")  # returns once every decode thread has finished
        if code != 3 or args.rejoin_s <= 0:
            return code
        # The coordinator has dropped this connection (or will, after its own peer_timeout_s) and continues its
        # unfinished responses elsewhere: join again as a new peer (a new routing id) with an empty batch.
        now = time.monotonic()
        lost_at = now if lost_at is None or peer.heard else lost_at  # the start of this outage
        if now - lost_at > args.rejoin_s:
            log.error("rollout.rejoin_gave_up", rejoin_s=args.rejoin_s, sessions=session + 1)
            return code
        if worker.version:  # back to the initial policy, as a fresh worker: the run may have rolled back to a
            getattr(backend, "close", lambda: None)()  # version the coordinator sends on join (none for 0)
            backend = build_rollout(cfg, args.init, args.worker_id)
        session += 1
        log.warning("rollout.rejoining", session=session, endpoint=args.endpoint, served_version=worker.version)


if __name__ == "__main__":
    sys.exit(main())
