"""The sglang backend (``rollout.backend=sglang``, ``reward.judge.backend=sglang``): the ``RolloutBatch`` /
``RolloutBackend`` of engine/backends/base.py over an sglang server, and the judge. The wire format (command line,
``/generate`` JSON, streamed items, routes, weight folders) and the HTTP client are in
engine/backends/sglang_wire.py.

Every unfinished row has one streamed ``/generate`` request in flight (one sample per request, so a group's prompt
is shared through sglang's radix cache). Without routes, tokens join their row as they arrive, so the worker
forwards them in chunks while the response is still running; with routes they join when the request finishes
or is paused, since sglang sends routes only then. A request is never timed out for its length: a server that
sends nothing on a request for ``rollout.sglang_idle_timeout_s`` seconds and does not answer ``/health`` is lost,
and the batch raises (the worker exits, the coordinator continues its responses elsewhere from what was streamed).
Only the first sample of a group asks for the prompt's routes; every request asks only for the routes it does not
have yet (``routed_experts_start_len``).

Nothing here imports sglang: the server runs in its own environment (``rollout.sglang_python``) or is given by
``rollout.sglang_url``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.backends.sglang_wire import (SGLangClient, StreamSink, check_sglang_python,  # noqa: F401
                                         decode_routed_experts, finish_type, generate_payload, hub_layout,
                                         parse_generate_response, server_args, stream_delta, write_model_dir)
from engine.modeling.routing import route_dtype


def moe_shape(config: dict) -> tuple[int, int, int]:
    """(MoE layers, top_k, routed experts) from an HF MoE ``config.json``, read through the family's adapter
    (engine/modeling/adapters.py). sglang's ``routed_experts`` has ``num_hidden_layers`` rows per position (dense
    layers zero): ``adapter_for(config).routed_layers`` selects the MoE layers."""
    from engine.modeling.adapters import adapter_for

    adapter = adapter_for(config)
    if adapter is None:
        raise ValueError(f"config.json (model_type {config.get('model_type')!r}) has no routed experts: "
                         f"not an MoE model")
    return len(adapter.sparse_layers()), adapter.top_k, adapter.num_experts


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
    kv_on_update=recompute)."""

    def __init__(self, backend: SGLangBackend, *, capture_routes: bool) -> None:
        self._backend, self._capture = backend, capture_routes
        self.rows: list = []
        self._inflight: dict[int, _Segment] = {}  # id(row) -> its request
        self._wake = threading.Event()
        self.discarded_partial_tokens = 0  # partial outputs returned without routes (sent again instead)

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
        self.rows = [r for r in self.rows if id(r) not in gone]

    def invalidate(self) -> None:
        """Nothing to do: rows in flight at a weight update were aborted and are re-sent (recomputed) anyway."""

    def step(self, version: int) -> None:
        """Send every idle unfinished row; fold in what arrived within a short wait."""
        import uuid

        for r in self.rows:
            if not r.done and id(r) not in self._inflight:
                rid, routes_from = uuid.uuid4().hex, _routes_from(r)
                stream = StreamSink(self._wake)
                future = self._backend.submit(r, rid, self._capture, stream, routes_from)
                self._inflight[id(r)] = _Segment(rid, version, len(r.tokens), routes_from, stream, future)
        if self._inflight:
            self._wake.wait(timeout=_POLL_S)
        self._collect()

    def drain(self) -> None:
        """Wait for every request in flight (after a pause they return at once) and fold them in."""
        while self._inflight:
            self._wake.wait(timeout=_POLL_S)
            self._collect()

    def _collect(self) -> None:
        self._wake.clear()
        by_id = {id(r): r for r in self.rows}
        for key, seg in list(self._inflight.items()):
            done = seg.future.done()  # read first: all it streamed before it ended is taken below
            if self._take(by_id[key], seg):
                del self._inflight[key]
            elif done:
                del self._inflight[key]
                seg.future.result()  # raises why the stream ended early
                raise ConnectionError(f"sglang {self._backend.client.url}: a stream ended without a finish_reason")
        self._watch()

    def _take(self, row, seg: _Segment) -> bool:
        """Fold what ``seg`` streamed since the last call into ``row``; True once the request is over."""
        return any(self._fold(row, seg, item) for item in seg.stream.take() if item)

    def _fold(self, row, seg: _Segment, item: dict) -> bool:
        """Fold one streamed item into ``row``; True once the request is over."""
        ids, logprobs = stream_delta(item, seg.have)
        seg.have += len(ids)
        reason = finish_type(item)
        finish = reason if reason in ("stop", "length") else None
        if not self._capture:
            row.extend(ids, logprobs, seg.version, finish=finish)
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

    def _watch(self) -> None:
        """Streams silent for the idle timeout: wait on if the server answers ``/health`` (the request is queued or
        retracted), else kill them; their readers then fail and the next ``_collect`` raises."""
        timeout_s, now = self._backend.idle_timeout_s, time.monotonic()
        idle = [s for s in self._inflight.values() if now - s.stream.last_bytes > timeout_s]
        if not idle:
            return
        alive = self._backend.client.healthy(timeout_s=min(5.0, timeout_s))
        for seg in idle:
            if alive:
                seg.stream.touch()
            else:
                seg.stream.kill(f"sglang at {self._backend.client.url} sent nothing for {timeout_s:g}s on a "
                                f"streamed request and its /health does not answer: the server is lost "
                                f"(rollout.sglang_idle_timeout_s)")


_POLL_S = 0.05  # step(): how long to wait for streamed tokens before handing control back


def _routes_from(row) -> int:
    """The first position of ``row.prompt + row.tokens`` whose routes the row lacks: 0 while it still wants the
    prompt's (the group's first sample), else the first token without a route."""
    if row.want_prompt_routes and row.prompt_routes is None:
        return 0
    return len(row.prompt) + row.route_base + len(row.routes)


class SGLangBackend:
    """A rollout worker's generation on an sglang server (GPU): the worker's actor, transport and coordinator
    code are the same as with the transformers backend.

    - ``url``: connect to a running server; without one the worker launches ``<python> -m sglang.launch_server``
      (``server_args``) on ``port`` and waits for ``/health``.
    - In-flight weight updates: ``/pause_generation`` (mode ``abort``: requests in flight return their partial
      tokens) -> ``/update_weights_from_disk`` -> ``/continue_generation``; unfinished rows are sent again with
      their tokens as prefix, so every token keeps the version that sampled it and its routes. The folder it
      loads is this backend's own (``<weights dir>/.sglang/<worker>-<pid>-<id>/policy_v<N>``, written once in the
      model's dtype) and the previous version's folder is removed once the server has loaded the new one.
    """

    def __init__(self, init_dir: str, *, url: str = "", port: int = 30000, eos_id: int, quantization: str = "",
                 kv_cache_dtype: str = "auto", max_inflight: int = 512, start_timeout_s: float = 900.0,
                 python: str = "", idle_timeout_s: float = 120.0, worker_id: int = 0) -> None:
        import atexit
        import json
        import os
        import sys
        import uuid
        from concurrent.futures import ThreadPoolExecutor

        from engine.modeling.adapters import adapter_for

        config = json.loads((Path(init_dir) / "config.json").read_text())
        self.adapter = adapter_for(config)
        self.num_layers, self.top_k, self.num_experts = moe_shape(config) if self.adapter else (0, 0, 1)
        self.init_dir, self.eos_id, self.idle_timeout_s = init_dir, eos_id, idle_timeout_s
        self._instance = f"w{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # its own weight folders
        self._loaded: Path | None = None  # the folder the server loaded last
        self._root: Path | None = None  # the newest folder written (its parent holds this instance's)
        self._proc = None
        if not url:
            import subprocess

            python = python or sys.executable
            check_sglang_python(python)
            url = f"http://127.0.0.1:{port}"
            self._proc = subprocess.Popen(server_args(init_dir, python=python, port=port, quantization=quantization,
                                                      kv_cache_dtype=kv_cache_dtype))
        atexit.register(self.close)  # a worker that exits takes its server and weight folders with it
        self.client = SGLangClient(url)
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="sglang")
        self._batch: SGLangBatch | None = None
        self._wait_healthy(start_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.client.healthy():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"sglang.launch_server exited with {self._proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sglang server answered {self.client.url}/health within {timeout_s:.0f}s")
            time.sleep(1.0)

    def new_batch(self, *, capture_routes: bool) -> SGLangBatch:
        if capture_routes and self.adapter is None:
            raise ValueError(f"{self.init_dir} is a dense model (no routed experts): pass rollout.return_routes=false")
        self._batch = SGLangBatch(self, capture_routes=capture_routes)
        return self._batch

    def submit(self, row, rid: str, capture_routes: bool, sink: StreamSink, routes_from: int = 0):
        body = generate_payload([row.prompt + row.tokens], max_new_tokens=row.max_new_tokens - len(row.tokens),
                                temperature=row.temperature, eos_id=self.eos_id, return_routes=capture_routes,
                                routes_start=routes_from, stream=True)
        body["rid"] = rid
        body["input_ids"] = body["input_ids"][0]  # a single request: its items come back as single objects
        return self._pool.submit(self.client.stream, "/generate", body, sink)

    def abort(self, rid: str) -> None:
        self._pool.submit(self.client.post, "/abort_request", {"rid": rid})

    async def run_decode(self, decode_chunk) -> None:
        import asyncio

        await asyncio.to_thread(decode_chunk)

    async def load_async(self, path: str, digest: str = "") -> None:
        import asyncio

        await asyncio.to_thread(self.load, path, digest)

    def model_dir(self, path: str) -> Path:
        """This backend's folder for the policy file ``path`` (beside it, under ``.sglang/<this instance>``)."""
        return Path(path).parent / ".sglang" / self._instance / Path(path).stem

    def load(self, path: str, digest: str = "") -> None:
        """Write this backend's folder for ``path`` from its bytes checked against ``digest`` (a file that fails
        raises ``WeightsRejected`` before anything is written or paused), pause (requests in flight return), fold
        partial outputs in, load the new weights, continue; then remove the previous version's folder."""
        import re
        import shutil

        from safetensors.torch import load as load_bytes

        from engine.backends.weights_file import read_verified

        m = re.search(r"policy_v(\d+)\.safetensors$", path)
        model_dir = self._root = self.model_dir(path)
        if not model_dir.exists():  # else this instance wrote it already, from verified bytes
            write_model_dir(path, self.init_dir, str(model_dir), state=read_verified(path, digest, load_bytes))
        self.client.post("/pause_generation", {"mode": "abort"})
        try:
            if self._batch is not None:
                self._batch.drain()
            body = {"model_path": str(model_dir), "flush_cache": True}
            if m:
                body["weight_version"] = m.group(1)
            result = self.client.post("/update_weights_from_disk", body)
            if not result.get("success", False):
                shutil.rmtree(model_dir, ignore_errors=True)
                raise RuntimeError(f"sglang could not load {model_dir}: {result.get('message')}")
        finally:
            self.client.post("/continue_generation", {})
        if self._loaded is not None and self._loaded != model_dir:
            shutil.rmtree(self._loaded, ignore_errors=True)
        self._loaded = model_dir

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        if routes:
            return np.stack(routes)
        return np.zeros((0, self.num_layers, self.top_k), dtype=route_dtype(self.num_experts))

    def close(self) -> None:
        """Stop the requests and the server this backend started; remove its weight folders."""
        import shutil

        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._batch is not None:
            for seg in self._batch._inflight.values():
                seg.stream.kill("closed")
        if self._root is not None:
            shutil.rmtree(self._root.parent, ignore_errors=True)
            self._loaded = self._root = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


def build(cfg, init_dir: str, worker_id: int) -> SGLangBackend:
    """Rollout worker ``worker_id``'s backend (engine/backends/registry.py): its own server on ``sglang_port +
    worker_id``, launched by ``rollout.sglang_python``, unless ``rollout.sglang_url`` names a running one."""
    from engine.data.tokenizer import load_tokenizer

    r = cfg.rollout
    return SGLangBackend(init_dir, url=r.sglang_url, port=r.sglang_port + worker_id,
                         eos_id=load_tokenizer(cfg.model).eos_id, quantization=r.quantization,
                         kv_cache_dtype=r.kv_cache_dtype, max_inflight=r.max_batch_samples,
                         python=r.sglang_python, idle_timeout_s=r.sglang_idle_timeout_s, worker_id=worker_id)


# ---- the generative judge: text prompts on a running server, one batched request per group ---------------------


class SglangJudgeBackend:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.client = SGLangClient(url, timeout_s=timeout_s)

    @staticmethod
    def payload(prompts: list[str], *, max_new_tokens: int, temperature: float) -> dict:
        return {"text": prompts, "sampling_params": {"temperature": float(temperature),
                                                     "max_new_tokens": int(max_new_tokens)}}

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        body = self.payload(prompts, max_new_tokens=max_new_tokens, temperature=temperature)
        return self.parse(self.client.post("/generate", body), len(prompts))

    @staticmethod
    def parse(items, num: int) -> list[str]:
        items = [items] if isinstance(items, dict) else items
        if len(items) != num:
            raise ValueError(f"sglang returned {len(items)} results for {num} judge prompts")
        return [str(item["text"]) for item in items]


def build_judge(cfg, init_dir: str | None, char_tokenizer) -> SglangJudgeBackend:
    """The judge on ``reward.judge.url`` (engine/backends/registry.py)."""
    return SglangJudgeBackend(cfg.reward.judge.url, timeout_s=cfg.reward.judge.timeout_s)
