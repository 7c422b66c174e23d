"""What travels between a rollout worker and an sglang server (engine/backends/sglang.py drives it), and how: the
server's command line, the ``/generate`` JSON, its streamed form, the routed experts, the HTTP client and the weight
folders sglang loads.
Nothing here imports sglang: these functions only build and read the formats of sglang 0.5.23's source
(``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``, the tokenizer manager's output processor).

Requests go to sglang's native ``/generate`` endpoint (``GenerateReqInput``) with token ids in, token ids out:

    {"input_ids": [...], "sampling_params": {"temperature": T, "max_new_tokens": N, "stop_token_ids": [eos]},
     "return_logprob": true, "return_routed_experts": true, "routed_experts_start_len": S, "stream": true}

``return_routed_experts`` needs a server started with ``--enable-return-routed-experts``. A response item has
``output_ids``, ``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` per generated token, under the
temperature-scaled distribution sglang sampled from, which is what the learner's ratios need) and
``meta_info.routed_experts``: base64 of int32 ``[seqlen - 1 - S, num_hidden_layers, k]`` (positions
``[S, seqlen - 1)``; dense layers present and left at 0). ``decode_routed_experts`` selects the MoE layers through
the model family's adapter (engine/modeling/adapters.py) into the narrowest dtype (uint8 for <= 256 experts).

Streamed (``stream: true``), the answer is server-sent events, ``data: {item}`` per step and ``data: [DONE]``
last. By default every item holds all tokens so far; with ``--incremental-streaming-output`` only the new ones
(``stream_delta`` tells them apart by ``meta_info.completion_tokens``). Routes arrive with the finishing item only.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from engine.modeling.model import Generated
from engine.modeling.routing import route_dtype

# files from which sglang (transformers' AutoTokenizer) loads a tokenizer; without one: --skip-tokenizer-init
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def has_hf_tokenizer(model_dir: str) -> bool:
    return any((Path(model_dir) / name).exists() for name in HF_TOKENIZER_FILES)


def server_args(model_path: str, *, python: str, host: str = "127.0.0.1", port: int = 30000,
                quantization: str = "", kv_cache_dtype: str = "auto") -> list[str]:
    """The ``sglang.launch_server`` command line for a rollout worker's server, run by ``python``
    (``rollout.sglang_python``: sglang's own environment). MoE routes are always returned (router replay) and
    streamed items carry only new tokens. ``--skip-tokenizer-init`` when the model folder has no HF tokenizer
    (tokens in, tokens out). ``quantization="fp8"`` quantizes the bf16 weights to FP8 for rollout (re-applied at
    every weight load, training stays bf16) and ``kv_cache_dtype`` ("fp8_e5m2" / "fp8_e4m3") stores the KV cache
    in FP8; both are ``rollout.*`` options and only take effect on a GPU."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port", str(port),
            "--enable-return-routed-experts", "--incremental-streaming-output"]
    if not has_hf_tokenizer(model_path):
        argv.append("--skip-tokenizer-init")
    if quantization:
        if quantization != "fp8":
            raise ValueError(f"rollout.quantization={quantization!r} is invalid: use fp8 or leave it empty")
        argv += ["--quantization", "fp8"]
    if kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", kv_cache_dtype]
    return argv


def generate_payload(prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int,
                     return_routes: bool, routes_start: int = 0, stream: bool = False) -> dict:
    """The ``/generate`` body for a batch of token-id prompts (one sample each). ``routes_start`` > 0 asks for the
    routes of positions ``routes_start`` on only (``routed_experts_start_len``; at most the prompt's length)."""
    body = {"input_ids": [list(map(int, p)) for p in prompts],
            "sampling_params": {"temperature": float(temperature), "max_new_tokens": int(max_new_tokens),
                                "stop_token_ids": [int(eos_id)], "skip_special_tokens": False},
            "return_logprob": True, "return_routed_experts": bool(return_routes)}
    if return_routes and routes_start:
        body["routed_experts_start_len"] = int(routes_start)
    if stream:
        body["stream"] = True
    return body


def decode_routed_experts(payload: str, *, prompt_len: int, completion_len: int, num_layers: int, top_k: int,
                          num_experts: int, start: int = 0, adapter=None) -> tuple[np.ndarray, np.ndarray]:
    """sglang's base64 int32 ``routed_experts`` (positions ``[start, prompt_len + completion_len - 1)``, ``num_layers``
    rows each) -> (routes of prompt positions ``[start, prompt_len)``, response routes [T - 1, layers, k]) in
    ``route_dtype(num_experts)``. With ``adapter`` (engine/modeling/adapters.py) ``num_layers`` is the model's
    ``num_hidden_layers`` and only its MoE layers are kept (``adapter.routed_layers``). Raises ValueError naming
    what does not fit."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError(f"routed_experts is not base64: {e}") from None
    per_row = num_layers * top_k * 4
    rows = max(prompt_len + completion_len - 1 - start, 0)
    if len(raw) != rows * per_row:
        raise ValueError(f"routed_experts holds {len(raw)} bytes; positions {start}..{prompt_len} prompt + "
                         f"{completion_len} generated tokens x {num_layers} layers x top-{top_k} need "
                         f"{rows * per_row} (int32, seqlen - 1 - routed_experts_start_len rows). Was the server "
                         f"started with --enable-return-routed-experts for this model?")
    ids = np.frombuffer(raw, dtype="<i4").reshape(rows, num_layers, top_k)
    if adapter is not None:
        ids = adapter.routed_layers(ids)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"routed_experts names expert ids in [{int(ids.min())}, {int(ids.max())}]; the model has "
                         f"{num_experts} routed experts")
    ids = ids.astype(route_dtype(num_experts))
    split = max(prompt_len - start, 0)
    return ids[:split], ids[split:]


def check_logprobs(item: dict, token_ids: list[int], where: str) -> list[float]:
    """The behaviour log-probs of ``token_ids`` from ``item``'s ``meta_info.output_token_logprobs`` rows."""
    rows = (item.get("meta_info") or {}).get("output_token_logprobs")
    if rows is None:
        raise ValueError(f"{where} has no meta_info.output_token_logprobs: send return_logprob=true")
    if [int(r[1]) for r in rows] != token_ids:
        raise ValueError(f"{where}: output_token_logprobs token ids do not match output_ids")
    return [float(r[0]) for r in rows]


def parse_generate_response(items: list[dict] | dict, prompts: list[list[int]], *, num_layers: int, top_k: int,
                            num_experts: int, return_routes: bool, start: int = 0,
                            adapter=None) -> list[Generated]:
    """``/generate`` response items (one per prompt, in order) -> ``Generated`` per prompt (prompt routes from
    position ``start``)."""
    items = [items] if isinstance(items, dict) else items
    if len(items) != len(prompts):
        raise ValueError(f"sglang returned {len(items)} results for {len(prompts)} prompts")
    out = []
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        meta = item.get("meta_info") or {}
        token_ids = [int(t) for t in item.get("output_ids", [])]
        logprobs = check_logprobs(item, token_ids, f"result {i}")
        prompt_routes = routes = None
        if return_routes:
            if "routed_experts" not in meta:
                raise ValueError(f"result {i} has no meta_info.routed_experts: start sglang with "
                                 f"--enable-return-routed-experts and send return_routed_experts=true")
            prompt_routes, routes = decode_routed_experts(
                meta["routed_experts"], prompt_len=len(prompt), completion_len=len(token_ids),
                num_layers=num_layers, top_k=top_k, num_experts=num_experts, start=start, adapter=adapter)
        out.append(Generated(token_ids, logprobs, prompt_routes, routes))
    return out


def finish_type(item: dict) -> str:
    """``meta_info.finish_reason.type`` ("stop" | "length" | "abort"), "" while the request runs."""
    reason = (item.get("meta_info") or {}).get("finish_reason") or {}
    return str(reason.get("type", "")) if isinstance(reason, dict) else str(reason)


def stream_delta(item: dict, have: int) -> tuple[list[int], list[float]]:
    """The tokens (and their log-probs) a streamed item adds to the ``have`` received so far: items hold all tokens
    so far (sglang's default) or only new ones (``--incremental-streaming-output``); ``completion_tokens`` says
    which."""
    ids = [int(t) for t in item.get("output_ids") or []]
    total = (item.get("meta_info") or {}).get("completion_tokens")
    if total is None:
        raise ValueError("a streamed sglang item has no meta_info.completion_tokens")
    logprobs = check_logprobs(item, ids, "a streamed sglang item")
    if len(ids) == total and have <= total:  # cumulative (or the first incremental item)
        return ids[have:], logprobs[have:]
    if have + len(ids) == total:  # incremental
        return ids, logprobs
    raise ValueError(f"a streamed sglang item holds {len(ids)} tokens with completion_tokens={total} after {have} "
                     f"received: neither all tokens so far nor only the new ones")


def weight_version_number(label, initial: int = 0) -> int:
    """sglang's ``weight_version`` label -> a policy version: the backend sends ``weight_version=str(N)`` with every
    update, so a decimal label is that N; any other label (sglang's ``--weight-version`` default ``"default"``) names
    the weights the server started with, ``initial``."""
    text = str(label)
    return int(text) if text.isdigit() else initial


def decode_weight_versions(segments, lo: int, hi: int, total: int, *, initial: int = 0) -> list[int]:
    """The policy version of each output token ``lo..hi-1`` of a request, from its ``meta_info.weight_versions``
    (``[{"version": label, "start": s, "end": e}, ...]``: the output tokens ``[s, e)`` were sampled under the
    weights labelled ``label``; sglang tracks them across ``/pause_generation`` mode ``retract``). The segments must
    cover the ``total`` output tokens so far exactly once, in order, from 0: a gap, an overlap, an empty or
    out-of-order segment, or one past ``total`` raises ValueError naming it."""
    if not isinstance(segments, list) or not segments and total:
        raise ValueError(f"meta_info.weight_versions={segments!r} is not a list of {{version, start, end}} segments "
                         f"covering {total} output tokens")
    versions, at = [], 0
    for seg in segments:
        try:
            start, end, label = int(seg["start"]), int(seg["end"]), seg["version"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"meta_info.weight_versions segment {seg!r} lacks an integer start/end or a "
                             f"version") from None
        if start != at or end <= start:
            what = "overlaps the previous one" if start < at else "leaves a gap" if start > at else "is empty"
            raise ValueError(f"meta_info.weight_versions segment {seg!r} {what} (tokens [0, {at}) are covered): "
                             f"segments must tile the output tokens in order")
        if end > total:
            raise ValueError(f"meta_info.weight_versions segment {seg!r} ends past the {total} output tokens")
        versions += [weight_version_number(label, initial)] * (end - start)
        at = end
    if at != total:
        raise ValueError(f"meta_info.weight_versions covers {at} of the {total} output tokens")
    if not 0 <= lo <= hi <= total:
        raise ValueError(f"tokens [{lo}, {hi}) are not within the {total} output tokens")
    return versions[lo:hi]


def iter_sse(lines: Iterable[bytes], on_bytes=None) -> Iterator[dict]:
    """sglang's server-sent events (``data: {json}`` lines, ``data: [DONE]`` last) -> the items. An error event
    (``{"error": {"message": ...}}``) raises RuntimeError with the server's message."""
    for line in lines:
        if on_bytes is not None:
            on_bytes()
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        item = json.loads(data)
        if isinstance(item, dict) and "error" in item:
            raise RuntimeError(f"sglang stream error: {str(item['error'])[:500]}")
        yield item


# ---- the HTTP client ---------------------------------------------------------------------------------------------


def check_sglang_python(python: str) -> None:
    """Raise the one-line error naming ``rollout.sglang_python`` unless ``python`` can import sglang."""
    import subprocess

    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('sglang') is None)"
    try:
        ok = subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise RuntimeError(f"rollout.sglang_python={python!r} cannot import sglang: install sglang in its own "
                           f"environment and pass rollout.sglang_python=<that env>/bin/python, or "
                           f"rollout.sglang_url=<a running server>")


class StreamSink:
    """One streamed ``/generate`` request: its reader thread appends items, the batch takes them."""

    def __init__(self, wake: threading.Event) -> None:
        self._lock, self._wake = threading.Lock(), wake
        self._items: list[dict] = []
        self.last_bytes = time.monotonic()
        self.conn = None  # http.client connection, once open
        self.killed = ""  # why the batch closed it

    def touch(self) -> None:
        self.last_bytes = time.monotonic()

    def put(self, item: dict) -> None:
        with self._lock:
            self._items.append(item)
        self._wake.set()

    def take(self) -> list[dict]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def kill(self, reason: str) -> None:
        """Close the connection from another thread (the reader's blocking read returns)."""
        import socket

        self.killed = self.killed or reason
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class SGLangHTTPError(RuntimeError):
    """An sglang endpoint answered an HTTP error status: ``status``, and ``body`` (the JSON answer, or {})."""

    RETRYABLE = frozenset({500, 502, 503, 504})  # overloaded, starting or a transient failure: send it again

    def __init__(self, path: str, status: int, raw: bytes) -> None:
        super().__init__(f"sglang {path} answered HTTP {status}: {raw[:500]!r}")
        self.path, self.status = path, status
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        self.body = body if isinstance(body, dict) else {}

    @property
    def retryable(self) -> bool:
        return self.status in self.RETRYABLE


class SGLangClient:
    """sglang's native HTTP endpoints (``/generate``, ``/pause_generation``, ``/update_weights_from_disk``,
    ``/continue_generation``, ``/abort_request``, ``/health``), blocking; call them from threads. An HTTP error
    status raises ``SGLangHTTPError``; a server that cannot be reached raises ``ConnectionError`` naming it."""

    def __init__(self, url: str, *, timeout_s: float = 600.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def post(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise SGLangHTTPError(path, e.code, e.read()) from None
        except OSError as e:  # refused, reset, timed out (urllib's URLError is an OSError)
            raise ConnectionError(f"sglang {self.url}{path}: no answer ({getattr(e, 'reason', e)})") from None
        return json.loads(text) if text.strip() else {}

    def stream(self, path: str, body: dict, sink: StreamSink, connect_timeout_s: float = 30.0) -> None:
        """POST ``body`` with ``stream: true`` and hand every server-sent item to ``sink`` until the finishing
        one. No read timeout: the batch watches ``sink.last_bytes`` and kills a silent stream."""
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = sink.conn = cls(parts.hostname, parts.port, timeout=connect_timeout_s)
        try:
            if sink.killed:  # closed before it was sent (a request held by a pause is closed by the batch)
                raise ConnectionError(sink.killed)
            conn.request("POST", parts.path + path, body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            conn.sock.settimeout(None)
            if sink.killed:
                raise ConnectionError(sink.killed)
            resp = conn.getresponse()
            if resp.status != 200:
                raise SGLangHTTPError(path, resp.status, resp.read())
            for item in iter_sse(resp, on_bytes=sink.touch):
                sink.put(item)
                if finish_type(item):
                    return
            raise ConnectionError(f"sglang {self.url}{path} ended a stream without a finish_reason")
        except OSError as e:
            raise ConnectionError(sink.killed or f"sglang {self.url}{path}: the stream broke ({e})") from None
        finally:
            conn.close()
            sink.put({})  # wakes the batch (an empty item is skipped)

    def healthy(self, timeout_s: float = 5.0) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except OSError:
            return False


# ---- weights: the learner's safetensors file -> a folder /update_weights_from_disk reads -------------------------


def model_dtype(config: dict):
    """The torch dtype a ``config.json`` declares for its weights (``dtype``, or transformers 4's ``torch_dtype``)."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config.json dtype={name!r} is not a torch dtype (e.g. bfloat16)")
    return dtype


def hub_layout(state: dict, config: dict) -> dict:
    """transformers-5 in-memory names (fused experts) -> the checkpoint layout sglang's loader for this model
    family reads (engine/modeling/adapters.py ``hub_layout``: Qwen3's ``experts.{e}.gate_proj``, Mixtral's
    ``block_sparse_moe.experts.{e}.w1``, ...). A dense model keeps its names."""
    from engine.modeling.adapters import adapter_for

    adapter = adapter_for(config)
    return dict(state) if adapter is None else adapter.hub_layout(state)


def write_model_dir(policy_file: str, config_dir: str, out_dir: str, *, state: dict | None = None) -> str:
    """A folder sglang's ``/update_weights_from_disk`` can read: ``config.json`` (and ``generation_config.json``)
    from ``config_dir`` and the policy file's weights as ``model.safetensors`` in checkpoint layout and in the
    model's dtype (``model_dtype``: a bf16 model is written in bf16 whatever the learner wrote). ``state``: those
    weights already read (and verified) from ``policy_file``, which is then not read again. Written to a
    temporary folder and renamed, so the server never sees half of it; an existing ``out_dir`` is kept as it is.
    Returns ``out_dir``."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(config_dir) / "config.json").read_text())
    dtype = model_dtype(config)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name in ("config.json", "generation_config.json"):
            if (Path(config_dir) / name).exists():
                shutil.copyfile(Path(config_dir) / name, tmp / name)
        out_state = {}
        for name, value in hub_layout(load_file(policy_file) if state is None else state, config).items():
            value = value.to(dtype) if value.is_floating_point() else value
            # an expert sliced out of a fused tensor shares its storage: safetensors wants it on its own
            out_state[name] = value.clone() if value.untyped_storage().nbytes() != value.nbytes else value.contiguous()
        save_file(out_state, str(tmp / "model.safetensors"))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
