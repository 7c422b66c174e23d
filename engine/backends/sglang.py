"""The sglang backend (``rollout.backend=sglang``, ``reward.judge.backend=sglang``): its wire format for generation
with log-probs and routed experts, the ``RolloutBatch``/``RolloutBackend`` of engine/backends/base.py over a server,
and the judge. One backend, one file (engine/backends/registry.py): over 400 lines because the wire format, which
is most of it, reads best next to the code that sends and folds it.

Requests go to sglang's native ``/generate`` endpoint (``GenerateReqInput``) with token ids in, token ids out:

    {"input_ids": [[...], ...], "sampling_params": {"temperature": T, "max_new_tokens": N,
     "stop_token_ids": [eos]}, "return_logprob": true, "return_routed_experts": true}

``return_routed_experts`` needs a server started with ``--enable-return-routed-experts``. Each response item has
``output_ids``, ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` per generated token; by default
sglang reports them under the temperature-scaled distribution it sampled from, which is what the learner's
ratios need) and ``meta_info.routed_experts``: base64 of int32 ``[prompt_len + completion_len - 1, layers, k]``
(positions ``[routed_experts_start_len, seqlen - 1)``; start 0 here). ``parse_generate_response`` turns that into the
same ``Generated`` records as the transformers backend: prompt routes [P, layers, k] and response routes [T - 1,
layers, k] in the narrowest dtype (uint8 for <= 256 experts).

Nothing here imports sglang: these functions only build and read its documented JSON.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from engine.modeling.model import Generated
from engine.modeling.routing import route_dtype


def server_args(model_path: str, *, host: str = "127.0.0.1", port: int = 30000, quantization: str = "",
                kv_cache_dtype: str = "auto") -> list[str]:
    """The ``sglang.launch_server`` command line for a rollout worker's server. MoE routes are always returned
    (router replay). ``quantization="fp8"`` quantizes the bf16 weights to FP8 for rollout (the paper's FP8
    rollout; re-applied at every weight load, training stays bf16) and ``kv_cache_dtype`` ("fp8_e5m2" /
    "fp8_e4m3") stores the KV cache in FP8; both are ``rollout.*`` options and only take effect on a GPU."""
    argv = ["python", "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port", str(port),
            "--enable-return-routed-experts"]
    if quantization:
        if quantization != "fp8":
            raise ValueError(f"rollout.quantization={quantization!r} is invalid: use fp8 or leave it empty")
        argv += ["--quantization", "fp8"]
    if kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", kv_cache_dtype]
    return argv


def generate_payload(prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int,
                     return_routes: bool) -> dict:
    """The ``/generate`` body for a batch of token-id prompts (one sample each; repeat a prompt for a group)."""
    return {"input_ids": [list(map(int, p)) for p in prompts],
            "sampling_params": {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
                                "stop_token_ids": [int(eos_id)], "skip_special_tokens": False},
            "return_logprob": True, "return_routed_experts": bool(return_routes)}


def decode_routed_experts(payload: str, *, prompt_len: int, completion_len: int, num_layers: int, top_k: int,
                          num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """sglang's base64 int32 ``routed_experts`` -> (prompt routes [P, layers, k], response routes [T - 1, layers,
    k]) in ``route_dtype(num_experts)``. Raises ValueError naming what does not fit."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"routed_experts is not base64: {e}") from None
    per_row = num_layers * top_k * 4
    rows = prompt_len + completion_len - 1
    if len(raw) != rows * per_row:
        raise ValueError(f"routed_experts holds {len(raw)} bytes; {prompt_len} prompt + {completion_len} generated "
                         f"tokens x {num_layers} layers x top-{top_k} need {rows * per_row} (int32, seqlen - 1 rows). "
                         f"Was the server started with --enable-return-routed-experts for this model?")
    ids = np.frombuffer(raw, dtype="<i4").reshape(rows, num_layers, top_k)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"routed_experts names expert ids in [{int(ids.min())}, {int(ids.max())}]; the model has "
                         f"{num_experts} routed experts")
    ids = ids.astype(route_dtype(num_experts))
    return ids[:prompt_len], ids[prompt_len:]


def parse_generate_response(items: list[dict] | dict, prompts: list[list[int]], *, num_layers: int, top_k: int,
                            num_experts: int, return_routes: bool) -> list[Generated]:
    """``/generate`` response items (one per prompt, in order) -> ``Generated`` per prompt."""
    items = [items] if isinstance(items, dict) else items
    if len(items) != len(prompts):
        raise ValueError(f"sglang returned {len(items)} results for {len(prompts)} prompts")
    out = []
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        meta = item.get("meta_info") or {}
        token_ids = [int(t) for t in item.get("output_ids", [])]
        logprob_rows = meta.get("output_token_logprobs")
        if logprob_rows is None:
            raise ValueError(f"result {i} has no meta_info.output_token_logprobs: send return_logprob=true")
        if [int(r[1]) for r in logprob_rows] != token_ids:
            raise ValueError(f"result {i}: output_token_logprobs token ids do not match output_ids")
        logprobs = [float(r[0]) for r in logprob_rows]
        prompt_routes = routes = None
        if return_routes:
            if "routed_experts" not in meta:
                raise ValueError(f"result {i} has no meta_info.routed_experts: start sglang with "
                                 f"--enable-return-routed-experts and send return_routed_experts=true")
            prompt_routes, routes = decode_routed_experts(
                meta["routed_experts"], prompt_len=len(prompt), completion_len=len(token_ids),
                num_layers=num_layers, top_k=top_k, num_experts=num_experts)
        out.append(Generated(token_ids, logprobs, prompt_routes, routes))
    return out


# ---- the rollout backend: an sglang server driven over HTTP ----------------------------------------------

_POLL_S = 0.05  # step(): how long to wait for a segment to finish before handing control back


def hub_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers-5 in-memory names (fused ``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I])
    -> the checkpoint layout sglang's Qwen3-MoE loader reads (``experts.{e}.gate_proj|up_proj|down_proj.weight``,
    as ``save_pretrained`` writes it). Other tensors keep their names."""
    out = {}
    for name, value in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = np.ascontiguousarray(value[e, :inter])
                out[f"{prefix}{e}.up_proj.weight"] = np.ascontiguousarray(value[e, inter:])
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = np.ascontiguousarray(value[e])
        else:
            out[name] = value
    return out


def write_model_dir(policy_file: str, config_dir: str, out_dir: str) -> str:
    """A folder sglang's ``/update_weights_from_disk`` can read: ``config.json`` (and ``generation_config.json``)
    from ``config_dir`` and the policy file's weights as ``model.safetensors`` in checkpoint layout. Written to a
    temporary folder and renamed, so the server never sees half of it. Returns ``out_dir``."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.numpy import load_file, save_file

    out = Path(out_dir)
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name in ("config.json", "generation_config.json"):
            if (Path(config_dir) / name).exists():
                shutil.copyfile(Path(config_dir) / name, tmp / name)
        save_file(hub_layout(load_file(policy_file)), str(tmp / "model.safetensors"))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


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


class SGLangClient:
    """sglang's native HTTP endpoints (``/generate``, ``/pause_generation``, ``/update_weights_from_disk``,
    ``/continue_generation``, ``/abort_request``, ``/health``), blocking; call them from threads."""

    def __init__(self, url: str, *, timeout_s: float = 600.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def post(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        import json
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"sglang {path} answered HTTP {e.code}: {e.read()[:500]!r}") from None
        return json.loads(text) if text.strip() else {}

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False


@dataclass
class _Segment:
    """One ``/generate`` request continuing a row from its current tokens, under one policy version."""

    rid: str
    version: int
    start: int  # len(row.tokens) when it was sent
    future: object


class SGLangBatch:
    """The RolloutBatch contract (engine/backends/base.py: ``add``, ``step``, ``remove``, ``invalidate``) over an sglang
    server: every unfinished row has one ``/generate`` request in flight (one sample per request, so a group's
    prompt is shared through sglang's radix cache), sent by ``step(version)`` and folded into the row when it
    returns. A request cut short by a weight update (``/pause_generation`` with mode ``abort``) returns its partial
    tokens, which keep the version they were sampled with; the row is then sent again with those tokens as a
    prefix and continues under the new weights (the KV cache is recomputed: kv_on_update=recompute)."""

    def __init__(self, backend: "SGLangBackend", *, capture_routes: bool) -> None:
        self._backend, self._capture = backend, capture_routes
        self.rows: list = []
        self._inflight: dict[int, _Segment] = {}  # id(row) -> its request
        self.discarded_partial_tokens = 0  # partial outputs returned without routes (sent again instead)

    @property
    def active(self) -> int:
        return sum(not r.done for r in self.rows)

    def add(self, rows: list) -> None:
        self.rows.extend(rows)

    def remove(self, rows: list) -> None:
        gone = {id(r) for r in rows}
        for key in gone & self._inflight.keys():
            self._backend.abort(self._inflight.pop(key).rid)
        self.rows = [r for r in self.rows if id(r) not in gone]

    def invalidate(self) -> None:
        """Nothing to do: rows in flight at a weight update were aborted and are re-sent (recomputed) anyway."""

    def step(self, version: int) -> None:
        """Send every idle unfinished row; fold in the requests that finished within a short wait."""
        import concurrent.futures as cf
        import uuid

        for r in self.rows:
            if not r.done and id(r) not in self._inflight:
                rid = uuid.uuid4().hex
                self._inflight[id(r)] = _Segment(rid, version, len(r.tokens),
                                                 self._backend.submit(r, rid, self._capture))
        if self._inflight:
            cf.wait([s.future for s in self._inflight.values()], timeout=_POLL_S,
                    return_when=cf.FIRST_COMPLETED)
        self._collect(block=False)

    def drain(self) -> None:
        """Wait for every request in flight (after a pause they return at once) and fold them in."""
        self._collect(block=True)

    def _collect(self, *, block: bool) -> None:
        by_id = {id(r): r for r in self.rows}
        for key, seg in list(self._inflight.items()):
            if not (block or seg.future.done()):
                continue
            del self._inflight[key]
            row = by_id.get(key)
            if row is not None:
                self._fold(row, seg, seg.future.result())

    def _fold(self, row, seg: _Segment, item: dict) -> None:
        meta = item.get("meta_info") or {}
        reason = meta.get("finish_reason") or {}
        reason = reason.get("type", "") if isinstance(reason, dict) else str(reason)  # {"type": "stop", ...}
        prompt = row.prompt + row.tokens[:seg.start]
        [out] = parse_generate_response(
            [item], [prompt], num_layers=self._backend.num_layers, top_k=self._backend.top_k,
            num_experts=self._backend.num_experts, return_routes=self._capture and "routed_experts" in meta)
        if self._capture and "routed_experts" not in meta:
            if reason != "abort":
                raise ValueError("sglang returned no meta_info.routed_experts: start it with "
                                 "--enable-return-routed-experts (or pass rollout.return_routes=false)")
            self.discarded_partial_tokens += len(out.token_ids)  # an aborted request without routes: redo it
            return
        # with routes: every position of prompt + tokens but the last one is routed now, from position 0 on
        routes = np.concatenate([out.prompt_routes, out.routes]) if self._capture else None
        row.extend(out.token_ids, out.logprobs, seg.version, routes=routes,
                   finish=reason if reason in ("stop", "length") else None)


class SGLangBackend:
    """A rollout worker's generation on an sglang server (GPU): the worker's actor, transport and coordinator
    code are the same as with the transformers backend.

    - ``url``: connect to a running server; without one the worker launches ``python -m sglang.launch_server``
      (``server_args``: routed experts on, optional FP8) on ``port`` and waits for ``/health``.
    - In-flight weight updates: ``/pause_generation`` (mode ``abort``: requests in flight return their partial
      tokens) -> ``/update_weights_from_disk`` (a folder written from the learner's safetensors file) ->
      ``/continue_generation``; unfinished rows are sent again with their tokens as prefix, so every token keeps
      the version that sampled it and its routes.
    """

    def __init__(self, init_dir: str, *, url: str = "", port: int = 30000, eos_id: int, quantization: str = "",
                 kv_cache_dtype: str = "auto", max_inflight: int = 512, start_timeout_s: float = 900.0) -> None:
        import json
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path

        self.num_layers, self.top_k, self.num_experts = moe_shape(json.loads((Path(init_dir) / "config.json").read_text()))
        self.init_dir, self.eos_id = init_dir, eos_id
        self._proc = None
        if not url:
            import subprocess

            url = f"http://127.0.0.1:{port}"
            self._proc = subprocess.Popen(server_args(init_dir, port=port, quantization=quantization,
                                                      kv_cache_dtype=kv_cache_dtype))
        self.client = SGLangClient(url)
        self._pool = ThreadPoolExecutor(max_workers=max_inflight, thread_name_prefix="sglang")
        self._batch: SGLangBatch | None = None
        self._wait_healthy(start_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        import time

        deadline = time.monotonic() + timeout_s
        while not self.client.healthy():
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"sglang.launch_server exited with {self._proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sglang server answered {self.client.url}/health within {timeout_s:.0f}s")
            time.sleep(1.0)

    def new_batch(self, *, capture_routes: bool) -> SGLangBatch:
        self._batch = SGLangBatch(self, capture_routes=capture_routes)
        return self._batch

    def submit(self, row, rid: str, capture_routes: bool):
        body = generate_payload([row.prompt + row.tokens], max_new_tokens=row.max_new_tokens - len(row.tokens),
                                temperature=row.temperature, eos_id=self.eos_id, return_routes=capture_routes)
        body["rid"] = rid
        body["input_ids"] = body["input_ids"][0]  # a single request: its item comes back as one object
        return self._pool.submit(self.client.post, "/generate", body)

    def abort(self, rid: str) -> None:
        self._pool.submit(self.client.post, "/abort_request", {"rid": rid})

    async def run_decode(self, decode_chunk) -> None:
        import asyncio

        await asyncio.to_thread(decode_chunk)

    async def load_async(self, path: str) -> None:
        import asyncio

        await asyncio.to_thread(self.load, path)

    def load(self, path: str) -> None:
        """Pause (requests in flight return), fold partial outputs in, load the new weights, continue."""
        import re
        from pathlib import Path

        m = re.search(r"policy_v(\d+)\.safetensors$", path)
        model_dir = write_model_dir(path, self.init_dir, str(Path(path).with_suffix("")) + "-sglang")
        self.client.post("/pause_generation", {"mode": "abort"})
        try:
            if self._batch is not None:
                self._batch.drain()
            body = {"model_path": model_dir, "flush_cache": True}
            if m:
                body["weight_version"] = m.group(1)
            result = self.client.post("/update_weights_from_disk", body)
            if not result.get("success", False):
                raise RuntimeError(f"sglang could not load {model_dir}: {result.get('message')}")
        finally:
            self.client.post("/continue_generation", {})

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        if routes:
            return np.stack(routes)
        return np.zeros((0, self.num_layers, self.top_k), dtype=route_dtype(self.num_experts))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


def build(cfg, init_dir: str, worker_id: int) -> SGLangBackend:
    """Rollout worker ``worker_id``'s backend (engine/backends/registry.py): its own server on ``sglang_port +
    worker_id`` unless ``rollout.sglang_url`` names a running one."""
    from engine.data.tokenizer import load_tokenizer

    r = cfg.rollout
    return SGLangBackend(init_dir, url=r.sglang_url, port=r.sglang_port + worker_id,
                         eos_id=load_tokenizer(cfg.model).eos_id, quantization=r.quantization,
                         kv_cache_dtype=r.kv_cache_dtype, max_inflight=r.max_batch_samples)


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
