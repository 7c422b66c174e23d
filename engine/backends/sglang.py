"""The sglang backend (``rollout.backend=sglang``, ``reward.judge.backend=sglang``): the ``RolloutBatch`` /
``RolloutBackend`` of engine/backends/base.py over an sglang server, and the judge. The wire format (command line,
``/generate`` JSON, streamed items, routes, weight folders) and the HTTP client are in
engine/backends/sglang_wire.py.

Every unfinished row has one streamed ``/generate`` request in flight (one sample per request, so a group's prompt
is shared through sglang's radix cache). Without routes, tokens join their row as they arrive, so the worker
forwards them in chunks while the response is still running; with routes they join when the request finishes
or is paused, since sglang sends routes only then. A request is never timed out for its length: a server that
sends nothing on a request for ``rollout.sglang_idle_timeout_s`` seconds and does not answer ``/health`` is lost.

Server faults (docs/guides/reliability.md, "sglang server faults"):
- ``/generate`` answered HTTP 500/502/503/504, or a stream broken while ``/health`` still answers: the request is
  sent again from the row's tokens, with a doubling wait (0.25 s to 8 s), until the server has failed for
  ``rollout.sglang_retry_s`` without answering anything;
- a lost server (its process died, its streams broke and ``/health`` does not answer, or it went silent): one this
  backend launched is stopped and launched again (at most ``max_relaunches`` times), loaded with the weights it
  served, and every unfinished row is sent again from its tokens; a server given by ``rollout.sglang_url`` makes
  the batch raise (the worker exits, the coordinator continues its responses elsewhere from what was streamed);
- a weight update the server refuses (sglang rolls back and answers 400): ``WeightsRejected``, so the worker keeps
  serving the previous version, reports it and takes the next one;
- a server that does not answer ``/health`` within ``rollout.sglang_start_timeout_s`` at start: the worker exits.
Only the first sample of a group asks for the prompt's routes; every request asks only for the routes it does not
have yet (``routed_experts_start_len``).

Nothing here imports sglang: the server runs in its own environment (``rollout.sglang_python``) or is given by
``rollout.sglang_url``.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import structlog

from engine.backends.sglang_wire import (SGLangClient, SGLangHTTPError, StreamSink,  # noqa: F401 (re-exported)
                                         check_sglang_python, decode_routed_experts, generate_payload,
                                         hub_layout, parse_generate_response, server_args, write_model_dir)
from engine.backends.sglang_batch import SGLangBatch  # noqa: F401 (re-exported)
from engine.modeling.routing import route_dtype

_REEXPORTED = (decode_routed_experts, hub_layout, parse_generate_response)  # imported from here (pyflakes: used)

log = structlog.get_logger()


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


class SGLangBackend:
    """A rollout worker's generation on an sglang server (GPU): the worker's actor, transport and coordinator
    code are the same as with the transformers backend.

    - ``url``: connect to a running server; without one the worker launches ``<python> -m sglang.launch_server``
      (``server_args``) on ``port`` and waits for ``/health``.
    - In-flight weight updates: ``/pause_generation`` (mode ``abort``: requests in flight return their partial
      tokens) -> ``/update_weights_from_disk`` -> ``/continue_generation``; unfinished rows are sent again with
      their tokens as prefix, so every token keeps the version that sampled it and its routes. With
      ``pause_mode="retract"`` (``rollout.sglang_pause_mode``) the requests stay in the server across the update
      and every token's version comes from ``meta_info.weight_versions`` (no routes: see ``new_batch``). The folder it
      loads is this backend's own (``<weights dir>/.sglang/<worker>-<pid>-<id>/policy_v<N>``, written once in the
      model's dtype) and the previous version's folder is removed once the server has loaded the new one.
    """

    def __init__(self, init_dir: str, *, url: str = "", port: int = 30000, eos_id: int, quantization: str = "",
                 kv_cache_dtype: str = "auto", max_inflight: int = 512, start_timeout_s: float = 900.0,
                 python: str = "", idle_timeout_s: float = 120.0, worker_id: int = 0, retry_s: float = 60.0,
                 health_interval_s: float = 1.0, max_relaunches: int = 3, pause_mode: str = "abort") -> None:
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
        self.start_timeout_s, self.retry_s, self.health_interval_s = start_timeout_s, retry_s, health_interval_s
        self.max_relaunches, self.relaunches = max_relaunches, 0
        if pause_mode not in ("abort", "retract"):
            raise ValueError(f"rollout.sglang_pause_mode={pause_mode!r}: pass abort or retract")
        self.pause_mode = pause_mode  # rollout.sglang_pause_mode
        self._instance = f"w{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # its own weight folders
        self._loaded: Path | None = None  # the folder the server loaded last
        self._root: Path | None = None  # the newest folder written (its parent holds this instance's)
        self._proc = None
        self._argv: list[str] = []  # the server's command line when this backend launches it
        if not url:
            python = python or sys.executable
            check_sglang_python(python)
            url = f"http://127.0.0.1:{port}"
            self._argv = server_args(init_dir, python=python, port=port, quantization=quantization,
                                     kv_cache_dtype=kv_cache_dtype)
            self._launch()
        atexit.register(self.close)  # a worker that exits takes its server and weight folders with it
        # streams open at exit: close them before concurrent.futures joins their reader threads (which runs before
        # atexit's handlers and would wait for every response to finish)
        getattr(threading, "_register_atexit", lambda f: None)(self._kill_streams)
        self.client = SGLangClient(url)
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="sglang")
        self._batch: SGLangBatch | None = None
        self._sync_group: str | None = None  # weight_sync=distributed: this server's group, and those it joined
        self._joined: set[str] = set()
        self._broadcast_version: int | None = None  # the version broadcast into the server, when that is what it serves
        self._wait_healthy(start_timeout_s)
        if quantization == "fp8":
            self._check_online_updates()

    def _launch(self) -> None:
        """Start the server in this worker's session (the coordinator's SIGKILL of the session reaches it) and
        bound to this process's life (PR_SET_PDEATHSIG): a worker killed any way never leaves a server behind
        holding the GPU and the port its replacement needs."""
        import subprocess

        from engine.coordinator.procs import die_with_parent

        self._proc = subprocess.Popen(self._argv, preexec_fn=die_with_parent)

    def _check_online_updates(self) -> None:
        """rollout.quantization=fp8: load the served weights again (``/update_weights_from_disk`` of the initial
        folder) before any work starts, since sglang's FP8 path refuses online weight updates while Hopper FP8 BF16
        weight caches are active and RL updates the weights at every version: a refusal is a start-up error."""
        try:
            result = self.client.post("/update_weights_from_disk", {"model_path": self.init_dir, "flush_cache": True})
        except SGLangHTTPError as e:
            if e.status != 400:
                raise
            result = {"success": False, "message": e.body.get("message", str(e))}
        if not result.get("success", False):
            raise RuntimeError(
                f"rollout.quantization=fp8: the sglang server at {self.client.url} refused an online weight update "
                f"of the weights it serves ({result.get('message')}); sglang's FP8 path does not take online updates "
                f"while Hopper FP8 BF16 weight caches are active, and RL updates the weights at every version. Pass "
                f"rollout.quantization='' (rollout.kv_cache_dtype=fp8_e5m2 still keeps the KV cache in FP8)")
        log.info("sglang.fp8_online_update_ok", url=self.client.url)

    def _wait_healthy(self, timeout_s: float) -> None:
        """Poll ``/health`` every ``health_interval_s`` until it answers 200 (sglang answers 503 while starting)."""
        deadline = time.monotonic() + timeout_s
        while not self.alive():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"sglang.launch_server exited with {self._proc.returncode} before serving "
                                   f"{self.client.url}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sglang server answered {self.client.url}/health within {timeout_s:g}s "
                                   f"(rollout.sglang_start_timeout_s)")
            time.sleep(self.health_interval_s)

    def alive(self) -> bool:
        """The server answers ``/health`` (and, when this backend launched it, its process runs)."""
        if self._proc is not None and self._proc.poll() is not None:
            return False
        return self.client.healthy(timeout_s=min(5.0, self.idle_timeout_s))

    def can_relaunch(self) -> bool:
        return bool(self._argv) and self.relaunches < self.max_relaunches

    def relaunch(self, why: str) -> None:
        """Stop this backend's lost server (dead or hung), launch it again, wait for ``/health`` and load the
        weights it served, so the worker's version stays the server's."""
        if self._broadcast_version is not None:  # a fresh server would serve the initial weights as that version
            raise RuntimeError(f"the sglang server at {self.client.url} is lost ({why}) and held version "
                               f"{self._broadcast_version} only as broadcast weights (rollout.weight_sync="
                               f"distributed): the worker exits and its replacement takes the newest weights")
        self.relaunches += 1
        code = self._proc.poll() if self._proc is not None else None
        log.warning("sglang.relaunch", url=self.client.url, why=why, exit_code=code, relaunches=self.relaunches,
                    of=self.max_relaunches)
        self._stop_server()
        self._launch()
        self._wait_healthy(self.start_timeout_s)
        if self._loaded is not None:
            body = {"model_path": str(self._loaded), "flush_cache": True}
            if m := re.search(r"policy_v(\d+)$", self._loaded.name):
                body["weight_version"] = m.group(1)
            result = self.client.post("/update_weights_from_disk", body)
            if not result.get("success", False):
                raise RuntimeError(f"the relaunched sglang at {self.client.url} could not load the weights it "
                                   f"served ({self._loaded}): {result.get('message')}")
        log.info("sglang.relaunched", url=self.client.url, weights=str(self._loaded or self.init_dir))

    def _stop_server(self) -> None:
        import subprocess

        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10.0)

    def new_batch(self, *, capture_routes: bool) -> SGLangBatch:
        if capture_routes and self.adapter is None:
            raise ValueError(f"{self.init_dir} is a dense model (no routed experts): pass rollout.return_routes=false")
        if capture_routes and self.pause_mode == "retract":
            raise ValueError("rollout.sglang_pause_mode=retract recomputes a retracted request's KV under the new "
                             "weights, which overwrites the routes of its tokens sampled before the update: pass "
                             "rollout.return_routes=false, or rollout.sglang_pause_mode=abort")
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
        partial outputs in, load the new weights, continue; then remove the previous version's folder. A server that
        refuses the folder (sglang rolls back and answers 400) raises ``WeightsRejected`` too: it still serves the
        previous weights."""
        import shutil

        from safetensors.torch import load as load_bytes

        from engine.backends.weights_file import WeightsRejected, read_verified

        m = re.search(r"policy_v(\d+)\.safetensors$", path)
        model_dir = self._root = self.model_dir(path)
        if not model_dir.exists():  # else this instance wrote it already, from verified bytes
            write_model_dir(path, self.init_dir, str(model_dir), state=read_verified(path, digest, load_bytes))
        self._pause()
        try:
            body = {"model_path": str(model_dir), "flush_cache": True}
            if m:
                body["weight_version"] = m.group(1)
            try:
                result = self.client.post("/update_weights_from_disk", body)
            except SGLangHTTPError as e:  # 400: sglang rolled back to the weights it served
                if e.status != 400:
                    raise
                result = {"success": False, "message": e.body.get("message", str(e))}
            if not result.get("success", False):
                shutil.rmtree(model_dir, ignore_errors=True)
                raise WeightsRejected(path, "server_rejected", f"sglang at {self.client.url} could not load "
                                      f"{model_dir} and keeps the weights it serves: {result.get('message')}")
        finally:
            self.client.post("/continue_generation", {})
        if self._loaded is not None and self._loaded != model_dir:
            shutil.rmtree(self._loaded, ignore_errors=True)
        self._loaded = model_dir

    def _pause(self) -> None:
        """``/pause_generation`` before a weight update. Mode abort: requests in flight return their partial tokens,
        folded in here (``drain``) and sent again later. Mode retract: they stay inside sglang (re-queued; their KV
        is recomputed under the new weights after ``/continue_generation``) and report each token's version in
        ``meta_info.weight_versions``: nothing is aborted or sent again."""
        self.client.post("/pause_generation", {"mode": self.pause_mode})
        if self.pause_mode == "abort" and self._batch is not None:
            self._batch.drain()

    # ---- rollout.weight_sync=distributed (engine/backends/sglang_sync.py) ------------------------------------------

    def weight_group(self) -> tuple[str, int]:
        """(name, world size) of this server's weight group with learner rank 0: a new name after ``abandon_group``.
        One rank per server (a launched server runs without tensor parallelism)."""
        from engine.backends.sglang_sync import group_name

        if self._sync_group is None:
            self._sync_group = group_name(self._instance)
        return self._sync_group, 2

    def abandon_group(self) -> str:
        """Drop this server's group (its collectives may be out of step after a failure) -> its name, for the
        learner to drop too; the next ``weight_group`` is a new one."""
        from engine.backends.sglang_sync import drop_group

        name, self._sync_group = self._sync_group, None
        if name in self._joined:
            self._joined.discard(name)
            drop_group(self.client, name)
        return name or ""

    def load_distributed(self, sending, path: str = "", digest: str = "") -> None:
        """Receive the version ``sending`` announces while learner rank 0 broadcasts it: join the group if new, then
        pause (requests in flight return), fold partial outputs in, one session of one
        ``/update_weights_from_distributed`` per bucket, continue. A version no bucket of loaded keeps the previous
        one (``WeightsRejected``); one loaded in part is repaired from the disk file ``path`` of the same version
        (``load``), else RuntimeError: the server must not serve a mix (the worker exits, its server with it)."""
        import shutil

        from engine.backends import sglang_sync as sync
        from engine.backends.weights_file import WeightsRejected

        if sending.error:
            raise WeightsRejected(path or sending.group_name, "sender_refused", sending.error)
        if sending.master_port:
            sync.join_group(self.client, sending)
            self._joined.add(sending.group_name)
        self._pause()
        try:
            sync.session(self.client, "/begin_weight_update")
            try:
                loaded, refused = sync.receive_buckets(self.client, sending)
            finally:
                sync.session(self.client, "/end_weight_update")
        finally:
            self.client.post("/continue_generation", {})
        if not refused:
            log.info("sglang.weights_received", url=self.client.url, version=sending.version, buckets=loaded)
            if self._loaded is not None:  # a disk folder it served before: not needed any more
                shutil.rmtree(self._loaded, ignore_errors=True)
            self._loaded, self._broadcast_version = None, sending.version
            return
        where = f"sglang at {self.client.url} refused {len(refused)} of {loaded + len(refused)} buckets of version " \
                f"{sending.version} ({refused[0]})"
        if not loaded:
            raise WeightsRejected(path or sending.group_name, "server_rejected", f"{where}; it keeps the weights "
                                  f"it serves")
        log.error("weights.mixed_repair", version=sending.version, path=path, detail=f"{where}; loading the same "
                  "version from disk")
        try:
            self.load(path, digest)
            self._broadcast_version = None
        except (WeightsRejected, OSError) as e:
            raise RuntimeError(f"{where}, and the disk copy could not repair it ({e}): the server holds a mix of "
                               f"two versions and must not serve it") from None

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        if routes:
            return np.stack(routes)
        return np.zeros((0, self.num_layers, self.top_k), dtype=route_dtype(self.num_experts))

    def _kill_streams(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._batch is not None:
            for seg in list(self._batch._inflight.values()):
                seg.stream.kill("closed")

    def close(self) -> None:
        """Stop the requests and the server this backend started; remove its weight folders."""
        import shutil

        self._kill_streams()
        if self._root is not None:
            shutil.rmtree(self._root.parent, ignore_errors=True)
            self._loaded = self._root = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10.0)
            except Exception:  # noqa: BLE001 - atexit: never hang the worker's exit
                self._proc.kill()


def build(cfg, init_dir: str, worker_id: int) -> SGLangBackend:
    """Rollout worker ``worker_id``'s backend (engine/backends/registry.py): its own server on ``sglang_port +
    worker_id``, launched by ``rollout.sglang_python``, unless ``rollout.sglang_url`` names a running one."""
    from engine.data.tokenizer import load_tokenizer

    r = cfg.rollout
    return SGLangBackend(init_dir, url=r.sglang_url, port=r.sglang_port + worker_id,
                         eos_id=load_tokenizer(cfg.model).eos_id, quantization=r.quantization,
                         kv_cache_dtype=r.kv_cache_dtype, max_inflight=r.max_batch_samples,
                         python=r.sglang_python, idle_timeout_s=r.sglang_idle_timeout_s, worker_id=worker_id,
                         start_timeout_s=r.sglang_start_timeout_s, retry_s=r.sglang_retry_s,
                         health_interval_s=r.sglang_health_interval_s, pause_mode=r.sglang_pause_mode)


# ---- the generative judge: text prompts on a running server, one batched request per group ---------------------


class SglangJudgeBackend:
    """The judge on a running sglang server (``reward.judge.url``). A request answered HTTP 500/502/503/504 is sent
    again with a doubling wait (0.5 s to 8 s) for at most ``retry_s`` (default: ``reward.judge.timeout_s``); a server
    that cannot be reached raises a ``ConnectionError`` naming ``reward.judge.url`` (the reward worker records the
    group as not judged and keeps serving)."""

    def __init__(self, url: str, *, timeout_s: float, retry_s: float | None = None) -> None:
        self.client = SGLangClient(url, timeout_s=timeout_s)
        self.retry_s = timeout_s if retry_s is None else retry_s
        self.retries = 0

    @staticmethod
    def payload(prompts: list[str], *, max_new_tokens: int, temperature: float) -> dict:
        return {"text": prompts, "sampling_params": {"temperature": float(temperature),
                                                     "max_new_tokens": int(max_new_tokens)}}

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        body = self.payload(prompts, max_new_tokens=max_new_tokens, temperature=temperature)
        deadline, wait = time.monotonic() + self.retry_s, 0.5
        while True:
            try:
                return self.parse(self.client.post("/generate", body), len(prompts))
            except SGLangHTTPError as e:
                if not e.retryable or time.monotonic() + wait > deadline:
                    raise
                log.warning("judge.sglang_retry", url=self.client.url, status=e.status, wait_s=wait)
            except ConnectionError as e:
                raise ConnectionError(f"the judge's sglang server does not answer: {e}; is it running at "
                                      f"reward.judge.url={self.client.url}?") from None
            self.retries += 1
            time.sleep(wait)
            wait = min(2 * wait, 8.0)

    @staticmethod
    def parse(items, num: int) -> list[str]:
        items = [items] if isinstance(items, dict) else items
        if len(items) != num:
            raise ValueError(f"sglang returned {len(items)} results for {num} judge prompts")
        return [str(item["text"]) for item in items]


def build_judge(cfg, init_dir: str | None, char_tokenizer) -> SglangJudgeBackend:
    """The judge on ``reward.judge.url`` (engine/backends/registry.py)."""
    return SglangJudgeBackend(cfg.reward.judge.url, timeout_s=cfg.reward.judge.timeout_s)
