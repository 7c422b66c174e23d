"""The sglang backend's ``RolloutBatch`` (engine/backends/base.py): one streamed ``/generate`` request per unfinished
row, the retries of failed requests and the relaunch of a lost server (engine/backends/sglang.py's docstring says
how each server fault is handled; ``SGLangBackend`` is the server, its client and its weights)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from engine.backends.sglang_wire import (SGLangHTTPError, StreamSink, decode_routed_experts, decode_weight_versions,
                                         finish_type, stream_delta)

log = structlog.get_logger()


@dataclass
class _Segment:
    """One streamed ``/generate`` request continuing a row from its current tokens, under one policy version."""

    rid: str
    version: int
    start: int  # len(row.tokens) when it was sent
    routes_from: int  # first position of prompt + tokens whose routes it asks for
    stream: StreamSink
    future: object
    have: int = 0  # tokens received
    tokens: list[int] = field(default_factory=list)  # with routes: received, waiting for the routes at finish
    logprobs: list[float] = field(default_factory=list)


class SGLangBatch:
    """The RolloutBatch contract (engine/backends/base.py: ``add``, ``step``, ``remove``, ``invalidate``) over an
    sglang server (see the module docstring). A request cut short by a weight update (``/pause_generation`` with
    mode ``abort``) returns its partial tokens, which keep the version they were sampled with; the row is then
    sent again with those tokens as a prefix and continues under the new weights (the KV cache is recomputed:
    kv_on_update=recompute). With ``rollout.sglang_pause_mode=retract`` requests stay inside sglang across the
    update and every token's version is the server's own (``meta_info.weight_versions``), not the version the
    request was sent under."""

    def __init__(self, backend, *, capture_routes: bool) -> None:
        self._backend, self._capture = backend, capture_routes  # the SGLangBackend (engine/backends/sglang.py)
        self.rows: list = []
        self._inflight: dict[int, _Segment] = {}  # id(row) -> its request
        self._wake = threading.Event()
        self.discarded_partial_tokens = 0  # partial outputs returned without routes (sent again instead)
        self._retry_at: dict[int, float] = {}  # id(row) -> when it is sent again after a retryable failure
        self._backoff: dict[int, float] = {}  # id(row) -> its next wait
        self._failing_since: float | None = None  # the first failure since the server last answered anything
        self.retries = 0  # requests sent again after a retryable failure
        self.held_closed = 0  # requests held by a pause that drain() closed (their rows were sent again)

    @property
    def active(self) -> int:
        return sum(not r.done for r in self.rows)

    def add(self, rows: list) -> None:
        self.rows.extend(rows)

    def remove(self, rows: list) -> None:
        gone = {id(r) for r in rows}
        for key in gone & self._inflight.keys():
            seg = self._inflight.pop(key)
            self._backend.abort(seg.rid)
            seg.stream.kill("cancelled")
        for key in gone:
            self._retry_at.pop(key, None)
            self._backoff.pop(key, None)
        self.rows = [r for r in self.rows if id(r) not in gone]

    def invalidate(self) -> None:
        """Nothing to do: rows in flight at a weight update were aborted and are re-sent (recomputed) anyway."""

    def step(self, version: int) -> None:
        """Send every idle unfinished row; fold in what arrived within a short wait."""
        import uuid

        now = time.monotonic()
        for r in self.rows:
            if not r.done and id(r) not in self._inflight and self._retry_at.get(id(r), 0.0) <= now:
                self._retry_at.pop(id(r), None)
                rid, routes_from = uuid.uuid4().hex, _routes_from(r)
                stream = StreamSink(self._wake)
                future = self._backend.submit(r, rid, self._capture, stream, routes_from)
                self._inflight[id(r)] = _Segment(rid, version, len(r.tokens), routes_from, stream, future)
        if self._inflight:
            self._wake.wait(timeout=_POLL_S)
        elif self._retry_at:  # every unfinished row waits for its retry
            time.sleep(min(_POLL_S, max(0.0, min(self._retry_at.values()) - now)))
        self._collect()

    def drain(self) -> None:
        """Wait for every request in flight (after a pause they return at once) and fold them in. A request that
        reached the server only after the pause (sent from the pool just before it) is held there until
        ``/continue_generation`` and would never return: one not sent yet is not sent, one that streamed nothing
        within ``_SILENT_GRACE_S`` (or anything still open after ``_PAUSE_GRACE_S``) is closed, so the server drops
        it, and its row, with what it had, is sent again later."""
        for seg in self._inflight.values():  # still queued in the pool: not sent at all
            if seg.stream.conn is None:
                seg.stream.kill(_HELD)
                self.held_closed += 1
        t0 = time.monotonic()
        while self._inflight:
            waited = time.monotonic() - t0
            held = [key for key, seg in self._inflight.items()
                    if waited > _PAUSE_GRACE_S or (seg.have == 0 and waited > _SILENT_GRACE_S)]
            if held:
                self._close_held(held)
            if self._inflight:
                self._wake.wait(timeout=_POLL_S)
                self._collect()

    def _close_held(self, keys: list[int]) -> None:
        by_id = {id(r): r for r in self.rows}
        for key in keys:
            seg = self._inflight.pop(key)
            seg.stream.kill(_HELD)
            self._backend.abort(seg.rid)
            self._take(by_id[key], seg, key)
        self.held_closed += len(keys)
        log.info("sglang.held_requests_closed", count=len(keys), url=self._backend.client.url)

    def _collect(self) -> None:
        self._wake.clear()
        by_id = {id(r): r for r in self.rows}
        failed = []
        for key, seg in list(self._inflight.items()):
            done = seg.future.done()  # read first: all it streamed before it ended is taken below
            if self._take(by_id[key], seg, key):
                del self._inflight[key]
            elif done:
                del self._inflight[key]
                failed.append((key, seg))
        if failed:
            self._failed(failed, by_id)
        self._watch()

    def _take(self, row, seg: _Segment, key: int) -> bool:
        """Fold what ``seg`` streamed since the last call into ``row``; True once the request is over."""
        items = [item for item in seg.stream.take() if item]
        if items:  # the server answers: failures so far are over
            self._backoff.pop(key, None)
            if self._failing_since is not None:
                log.info("sglang.recovered", url=self._backend.client.url, retries=self.retries,
                         after_s=round(time.monotonic() - self._failing_since, 2))
                self._failing_since = None
        return any(self._fold(row, seg, item) for item in items)

    def _failed(self, failed: list[tuple[int, _Segment]], by_id: dict) -> None:
        """Requests that ended without a finish_reason (what they streamed is already folded in): an HTTP
        500/502/503/504, or a broken stream on a server that still answers ``/health``, is sent again later; a lost
        server (a stream killed by ``_watch``, or broken with ``/health`` failing) is launched again when this
        backend launched it, else raises; anything else (a malformed answer) raises."""
        b, lost, transient = self._backend, "", []
        for key, seg in failed:
            if seg.stream.killed == _HELD:  # closed by drain() before it was sent: the next step sends it
                continue
            error = seg.future.exception() or ConnectionError(
                f"sglang {b.client.url}: a stream ended without a finish_reason")
            if isinstance(error, SGLangHTTPError) and error.retryable:
                transient.append((key, error))
            elif isinstance(error, OSError):  # ConnectionError: broken, refused, or killed by _watch
                if seg.stream.killed:
                    lost = lost or seg.stream.killed
                elif not lost and b.alive():
                    transient.append((key, error))
                else:
                    lost = lost or (f"sglang at {b.client.url} broke a stream ({error}) and its /health does not "
                                    f"answer: the server is lost")
            else:
                raise error
        if lost:
            self._relaunch(lost, by_id)
            return
        for key, error in transient:
            self._retry_later(key, error)

    def _retry_later(self, key: int, error: BaseException) -> None:
        now, retry_s = time.monotonic(), self._backend.retry_s
        if self._failing_since is None:
            self._failing_since = now
            log.warning("sglang.failing", url=self._backend.client.url, error=str(error)[:300])
        if now - self._failing_since > retry_s:
            raise ConnectionError(f"sglang at {self._backend.client.url} answered nothing but failures for "
                                  f"{retry_s:g}s (last: {str(error)[:200]}): giving up (rollout.sglang_retry_s)")
        wait = self._backoff.get(key, _BACKOFF_S)
        self._retry_at[key], self._backoff[key] = now + wait, min(2 * wait, _MAX_BACKOFF_S)
        self.retries += 1

    def _relaunch(self, why: str, by_id: dict) -> None:
        """The server is lost: raise unless this backend launched it; else stop every request (what streamed
        stays in its row), launch it again and let the next ``step`` send every unfinished row again."""
        if not self._backend.can_relaunch():
            raise ConnectionError(why)
        for seg in self._inflight.values():
            seg.stream.kill(why)
        for key, seg in self._inflight.items():
            try:
                seg.future.exception(timeout=10.0)
            except Exception:  # noqa: BLE001 - a reader that does not end: its row is sent again anyway
                pass
            self._take(by_id[key], seg, key)
        self._inflight.clear()
        self._retry_at.clear()
        self._backoff.clear()
        self._failing_since = None
        self._backend.relaunch(why)

    def _fold(self, row, seg: _Segment, item: dict) -> bool:
        """Fold one streamed item into ``row``; True once the request is over."""
        ids, logprobs = stream_delta(item, seg.have)
        lo = seg.have
        seg.have += len(ids)
        reason = finish_type(item)
        finish = reason if reason in ("stop", "length") else None
        if not self._capture:
            if self._backend.pause_mode != "retract":
                row.extend(ids, logprobs, seg.version, finish=finish)
                return bool(reason)
            versions = self._server_versions(item, lo, seg.have)
            at = 0
            while at < len(ids) or (at == 0 and finish):  # one extend per run of tokens of one version
                end = at + 1
                while end < len(ids) and versions[end] == versions[at]:
                    end += 1
                row.extend(ids[at:end], logprobs[at:end], versions[at] if ids else seg.version,
                           finish=finish if end >= len(ids) else None)
                at = end
            return bool(reason)
        seg.tokens += ids
        seg.logprobs += logprobs
        if not reason:
            return False
        meta = item.get("meta_info") or {}
        if reason == "abort" and not seg.tokens:
            return True  # paused before its first token: nothing to keep
        if "routed_experts" not in meta:
            if reason != "abort":
                raise ValueError("sglang returned no meta_info.routed_experts: start it with "
                                 "--enable-return-routed-experts (or pass rollout.return_routes=false)")
            self.discarded_partial_tokens += len(seg.tokens)  # an aborted request without routes: redo it
            return True
        b = self._backend
        prompt_routes, routes = decode_routed_experts(
            meta["routed_experts"], prompt_len=len(row.prompt) + seg.start, completion_len=len(seg.tokens),
            num_layers=b.adapter.num_layers, top_k=b.top_k, num_experts=b.num_experts, start=seg.routes_from,
            adapter=b.adapter)
        row.extend(seg.tokens, seg.logprobs, seg.version, routes=np.concatenate([prompt_routes, routes]),
                   routes_from=seg.routes_from, finish=finish)
        return True

    def _server_versions(self, item: dict, lo: int, hi: int) -> list[int]:
        """rollout.sglang_pause_mode=retract: the versions of output tokens ``lo..hi-1`` from the item's
        ``meta_info.weight_versions``; a server that does not send them cannot say which weights sampled a token
        that crossed an update, so that is an error, not a guess."""
        meta = item.get("meta_info") or {}
        if "weight_versions" not in meta:
            raise ValueError(f"rollout.sglang_pause_mode=retract: the sglang server at {self._backend.client.url} "
                             f"sent no meta_info.weight_versions (per-token weight versions), so the version of a "
                             f"token sampled across a weight update is unknown: use an sglang that reports them, or "
                             f"pass rollout.sglang_pause_mode=abort")
        return decode_weight_versions(meta["weight_versions"], lo, hi, int(meta.get("completion_tokens", hi)))

    def _watch(self) -> None:
        """Streams silent for the idle timeout: wait on if the server answers ``/health`` (the request is queued or
        retracted), else kill them; their readers then fail and the next ``_collect`` raises."""
        timeout_s, now = self._backend.idle_timeout_s, time.monotonic()
        idle = [s for s in self._inflight.values() if now - s.stream.last_bytes > timeout_s]
        if not idle:
            return
        alive = self._backend.alive()
        for seg in idle:
            if alive:
                seg.stream.touch()
            else:
                seg.stream.kill(f"sglang at {self._backend.client.url} sent nothing for {timeout_s:g}s on a "
                                f"streamed request and its /health does not answer: the server is lost "
                                f"(rollout.sglang_idle_timeout_s)")


_POLL_S = 0.05  # step(): how long to wait for streamed tokens before handing control back
_HELD = "held by the pause for a weight update"  # why drain() closed a request (its row is sent again)
_PAUSE_GRACE_S = 2.0  # drain(): requests in flight at a pause return at once (ms); one still open then is held
_SILENT_GRACE_S = 0.25  # drain(): a request that streamed no token by then is held (or had nothing to keep)
_BACKOFF_S, _MAX_BACKOFF_S = 0.25, 8.0  # the first and the longest wait before a failed request is sent again


def _routes_from(row) -> int:
    """The first position of ``row.prompt + row.tokens`` whose routes the row lacks: 0 while it still wants the
    prompt's (the group's first sample), else the first token without a route."""
    if row.want_prompt_routes and row.prompt_routes is None:
        return 0
    return len(row.prompt) + row.route_base + len(row.routes)
