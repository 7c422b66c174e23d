"""A stand-in for an sglang server (sglang cannot run on our machines): the endpoints the rollout backend uses,
answering in the format of sglang 0.5.23's source, with a tiny HF MoE model generating for real.

- ``POST /generate`` (``input_ids``, ``sampling_params``, ``return_logprob``, ``return_routed_experts``,
  ``routed_experts_start_len``, ``rid``, ``stream``): one token per forward over the whole sequence (no KV cache:
  slow, simple, exact), ``output_ids``, ``meta_info.output_token_logprobs`` rows ``[logprob, token_id, None]``,
  ``meta_info.completion_tokens``, ``meta_info.routed_experts`` base64 int32 ``[seqlen - 1 - start,
  num_hidden_layers, k]`` (dense layers 0, as sglang sizes it) and ``meta_info.finish_reason.type`` (stop | length |
  abort; null while running). With ``stream`` the answer is server-sent events over chunked HTTP/1.1 (``data:
  {item}`` per token, ``data: [DONE]`` last): every item holds all tokens so far, or only the new ones with
  ``incremental=True`` (``--incremental-streaming-output``); routes ride on the finishing item only. A client that
  disconnects aborts its request.
- ``synthetic=True``: tokens, log-probs and routes from a formula instead of the model (fast, for long responses):
  token ``j`` is ``3 + (7 j) % (vocab - 3)``, its log-prob ``-1 - j / 1000``, the route of position ``p`` in MoE
  layer ``l``, slot ``s`` is ``(p + 3 l + s) % experts`` (``synthetic_route``).
- ``POST /pause_generation`` with mode ``abort``: requests in flight return at once with what they have
  (finish_reason abort); new ones wait until ``POST /continue_generation``. Mode ``retract`` (and ``in_place``):
  requests in flight stay, stop between two tokens and continue after ``/continue_generation`` under the weights
  loaded meanwhile (sglang re-queues a retracted request and recomputes its KV; this stand-in has no KV and runs
  the whole sequence every token anyway). Every item's ``meta_info.weight_versions`` lists ``{"version", "start",
  "end"}`` segments over the request's output tokens so far (absolute positions, also in incremental items): the
  weight version that sampled each token, read under the same lock as the forward that sampled it
  (``report_weight_versions = False``: none, as an sglang without them).
- Prefix cache (sglang's radix cache; not with ``synthetic``): a finished or aborted request's sequence is cached
  with the routes of every position it fed, as sglang's routed-experts capturer keeps routes per KV-cache slot; a
  request whose input starts with a cached prefix reuses at most ``len(input_ids) - 1`` positions
  (``meta_info.cached_tokens``), and their routes are not recomputed but read from the cache (the forward's own rows
  there are discarded), so they still come back in ``routed_experts``. A weight update flushes the cache.
- ``POST /update_weights_from_disk`` (``model_path``: a save_pretrained-layout folder) -> ``{"success": true}``; a
  folder it cannot load is answered HTTP 400 ``{"success": false, "message": ...}`` with the old weights kept (sglang
  rolls back).
- Weights broadcast by the learner (``rollout.weight_sync=distributed``, engine/backends/sglang_sync.py): ``POST
  /init_weights_update_group`` joins a real torch.distributed group (gloo) as rank ``rank_offset``;
  ``/begin_weight_update`` and ``/end_weight_update`` open and close the session (a second begin, or an update
  outside one, is refused as sglang refuses it); ``/update_weights_from_distributed`` receives each named tensor
  with ``broadcast(src=0)`` and loads the bucket; ``/destroy_weights_update_group``. Failures answer HTTP 400
  ``{"success": false, "message": ...}``. ``GET /_checksums`` (tests): sha256 of every served weight.
- ``POST /abort_request`` (``rid``), ``GET /health``; ``/generate`` with ``text`` prompts (the judge) answers every one
  ``"Verdict: Tie"``.
- ``GET /_progress`` (tests): ``{"live": {rid: tokens so far}}`` of the requests streaming now.
- ``silence()``: a lost server; streams stay open and send nothing, ``/health`` answers 503.

Faults, set per test with ``fault(**modes)`` in process or ``POST /_fault {modes}`` (a launched one), counted from
then on (``Faults``): ``die_after_tokens=N`` (after N more tokens the server dies: a launched process exits at once,
one in process drops every connection and stops listening), ``hang_after_tokens=N`` (then streams stay open and send
nothing, and ``/health`` never answers), ``status=503, status_count=K`` (the next K ``/generate`` requests are
answered with that status), ``update_failures=K`` (the next K weight updates are refused with 400; a bucket of
``/update_weights_from_distributed`` is received first, then refused), and
``start_delay_s=S`` (``/health`` and ``/generate`` answer 503 for S seconds, as sglang does while starting).

``python -m tests.sglang_standin --model-path DIR --port P`` serves one as its own process (other flags are
ignored; faults from the JSON in ``$SGLANG_STANDIN_FAULTS``); ``fake_sglang_env`` makes ``-m
sglang.launch_server`` start it, so a backend launches and relaunches it as it would sglang.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from engine.modeling.adapters import adapter_for
from engine.modeling.model import load_model
from engine.modeling.routing import route_hooks


def synthetic_route(position: int, layer: int, slot: int, experts: int) -> int:
    return (position + 3 * layer + slot) % experts


@dataclass
class Faults:
    """The fault modes of one stand-in (the module docstring); token counts are from when they were set."""

    die_after_tokens: int | None = None
    hang_after_tokens: int | None = None
    status: int = 503
    status_count: int = 0
    update_failures: int = 0
    start_delay_s: float = 0.0


class StandIn:
    def __init__(self, model_dir: str, *, seed: int = 0, token_delay_s: float = 0.01, incremental: bool = False,
                 synthetic: bool = False, port: int = 0, exit_on_death: bool = False) -> None:
        self.model = load_model(model_dir).eval()
        self.model_dir = model_dir
        self.groups: dict[str, object] = {}  # /init_weights_update_group: name -> process group
        self.session = False  # inside /begin_weight_update ... /end_weight_update
        self.adapter = adapter_for(self.model.config)
        self.lock = threading.Lock()  # one forward at a time; weights swap under it
        self.running = threading.Event()
        self.running.set()
        self.silent, self.closed = threading.Event(), threading.Event()
        self.epoch = 0  # bumped by every abort-mode pause: requests of an older epoch stop
        self.aborted: set[str] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.token_delay_s, self.incremental, self.synthetic = token_delay_s, incremental, synthetic
        self.report_weight_versions = True  # false: items lack meta_info.weight_versions (an older sglang)
        self.weight_version = "0"
        self.prefix_routes: dict[tuple, np.ndarray] = {}  # prefix cache: input[:p + 1] -> routes of position p
        self.cached_tokens: dict[str, int] = {}  # rid -> positions it took from the prefix cache
        self.calls: list[str] = []
        self.bodies: list[dict] = []  # every /generate body
        self.progress: dict[str, int] = {}  # rid -> tokens generated so far
        self.live: set[str] = set()  # rids being generated now (GET /_progress)
        self.faults, self.exit_on_death = Faults(), exit_on_death
        self.tokens = 0  # tokens generated in all
        self._die_at = self._hang_at = None  # self.tokens at which it dies / hangs
        self._ready_at = 0.0  # monotonic time from which it serves (start_delay_s)
        self.dead, self.hung = threading.Event(), threading.Event()
        self.failed_requests = 0  # /generate requests answered with a fault status
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def silence(self) -> None:
        self.silent.set()

    def fault(self, **modes) -> None:
        """Set fault modes (``Faults`` fields); token counts start now."""
        for name, value in modes.items():
            if not hasattr(self.faults, name):
                raise ValueError(f"unknown stand-in fault {name!r}")
            setattr(self.faults, name, value)
        if "die_after_tokens" in modes:
            self._die_at = None if modes["die_after_tokens"] is None else self.tokens + modes["die_after_tokens"]
        if "hang_after_tokens" in modes:
            self._hang_at = None if modes["hang_after_tokens"] is None else self.tokens + modes["hang_after_tokens"]
        if "start_delay_s" in modes:
            self._ready_at = time.monotonic() + float(modes["start_delay_s"])

    def starting(self) -> bool:
        return time.monotonic() < self._ready_at

    def die(self) -> None:
        """Killed: a launched process exits at once; in process every connection drops and nothing listens."""
        if self.exit_on_death:
            os._exit(1)
        self.dead.set()
        self.closed.set()
        try:
            self.server.socket.shutdown(socket.SHUT_RDWR)  # stops listening: new connections are refused
        except OSError:
            pass
        threading.Thread(target=self.close, daemon=True).start()

    def _count_token(self) -> None:
        self.tokens += 1
        if self._die_at is not None and self.tokens >= self._die_at:
            self.die()
        if self._hang_at is not None and self.tokens >= self._hang_at:
            self.hung.set()

    def _next(self, prompt: list[int], tokens: list[int],
              temperature: float) -> tuple[int, float, np.ndarray | None, str]:
        """(next token, its log-prob, routes [every fed position, num_hidden_layers, k]; None when synthetic, the
        weight version that sampled it)."""
        if self.synthetic:
            j = len(tokens)
            with self.lock:
                version = self.weight_version
            return 3 + (7 * j) % (self.model.config.vocab_size - 3), -1.0 - j / 1000, None, version
        with self.lock, torch.no_grad(), route_hooks(self.model) as log:
            logits = self.model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1)
            tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
            version = self.weight_version
        return tok, float(logp[tok]), self._full_layers(log.stacked(0).numpy()), version

    def _cached_prefix(self, seq: list[int]) -> int:
        """Positions of ``seq`` whose routes the prefix cache holds (at most ``len(seq) - 1``: sglang always computes
        the last input token, whose logits it samples from)."""
        n = 0
        while n < len(seq) - 1 and tuple(seq[:n + 1]) in self.prefix_routes:
            n += 1
        return n

    def _cache(self, seq: list[int], routes: np.ndarray) -> None:
        """Keep the routes of the positions ``seq`` fed (``routes[p]``: position p) in the prefix cache."""
        with self.lock:
            for p in range(min(len(routes), len(seq))):
                self.prefix_routes.setdefault(tuple(seq[:p + 1]), routes[p].copy())

    def _full_layers(self, moe_RLK: np.ndarray) -> np.ndarray:
        """MoE-layer routes -> sglang's ``[rows, num_hidden_layers, k]`` (dense layers 0)."""
        full = np.zeros((len(moe_RLK), self.model.config.num_hidden_layers, self.adapter.top_k), "<i4")
        full[:, self.adapter.sparse_layers()] = moe_RLK
        return full

    def _synthetic_routes(self, positions: int) -> np.ndarray:
        p, layer, slot = np.ogrid[:positions, :len(self.adapter.sparse_layers()), :self.adapter.top_k]
        return self._full_layers(synthetic_route(p, layer, slot, self.adapter.num_experts))

    def generate(self, body: dict, incremental: bool = False):
        """The response items of one request: one per token (the last one finishing it); ``incremental``: each
        holds only its new tokens."""
        self.running.wait()
        epoch, rid = self.epoch, body.get("rid", "")
        prompt = list(body["input_ids"])
        sp = body["sampling_params"]
        temperature, stops = float(sp["temperature"]), set(sp.get("stop_token_ids", []))
        start = int(body.get("routed_experts_start_len", 0))
        tokens, logprobs, versions, reason, sent = [], [], [], None, 0
        routes = self._full_layers(np.zeros((0, len(self.adapter.sparse_layers()), self.adapter.top_k), "<i4"))
        with self.lock:
            cached = 0 if self.synthetic else self._cached_prefix(prompt)
            cached_rows = np.stack([self.prefix_routes[tuple(prompt[:p + 1])] for p in range(cached)]) \
                if cached else None
        self.cached_tokens[rid] = cached
        while reason is None:
            while (self.silent.is_set() or self.hung.is_set()) and not self.closed.is_set():
                time.sleep(0.05)
            if self.dead.is_set():
                raise ConnectionAbortedError("the stand-in died")
            if epoch == self.epoch and not self.running.is_set():  # retract / in_place: wait inside the server
                while not self.running.wait(0.05) and not self.closed.is_set():
                    pass
            if epoch != self.epoch or rid in self.aborted or self.closed.is_set():
                reason = "abort"
            elif len(tokens) >= int(sp["max_new_tokens"]):
                reason = "length"
            else:
                tok, lp, routes, version = self._next(prompt, tokens, temperature)
                if cached_rows is not None:  # served from the prefix cache: not recomputed
                    routes[:cached] = cached_rows
                versions.append(version)
                tokens.append(tok)
                logprobs.append(lp)
                self.progress[rid] = len(tokens)
                self._count_token()
                if self.dead.is_set():
                    raise ConnectionAbortedError("the stand-in died")
                reason = "stop" if tok in stops else None
                if reason is None and len(tokens) >= int(sp["max_new_tokens"]):
                    reason = "length"
            lo = sent if incremental else 0
            meta = {"id": rid, "finish_reason": {"type": reason} if reason else None,
                    "prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                    "weight_version": self.weight_version, "cached_tokens": cached,
                    "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs[lo:], tokens[lo:])]}
            if self.report_weight_versions:
                meta["weight_versions"] = version_segments(versions)
            if reason and not self.synthetic:
                self._cache(prompt + tokens, routes)
            if reason and body.get("return_routed_experts"):
                if self.synthetic:
                    routes = self._synthetic_routes(len(prompt) + len(tokens))
                rows = routes[start:len(prompt) + len(tokens) - 1]
                meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(rows).tobytes()).decode()
            sent = len(tokens)
            yield {"text": "", "output_ids": tokens[lo:], "meta_info": meta}
            if reason is None:
                time.sleep(self.token_delay_s)

    def update(self, body: dict) -> dict:
        if self.faults.update_failures > 0:
            self.faults.update_failures -= 1
            return {"success": False, "message": "stand-in fault: failed to load the weights; rolled back"}
        try:
            new = load_model(body["model_path"]).eval()
        except Exception as e:  # sglang answers success=false with a message (HTTP 400), the old weights kept
            return {"success": False, "message": repr(e)}
        with self.lock:
            self.model.load_state_dict(new.state_dict())
            self.weight_version = str(body.get("weight_version", self.weight_version))
            if body.get("flush_cache", True):
                self.prefix_routes.clear()
        return {"success": True, "message": "ok", "num_paused_requests": 0}

    # ---- weights broadcast by the learner (sglang 0.5.23: the weight updater's session, the model runner's
    # receive: allocate each named tensor, broadcast(src=0) on the group in names order, then load the bucket) ----

    def init_group(self, body: dict) -> dict:
        """``/init_weights_update_group``: join the group as rank ``rank_offset`` (one tensor-parallel rank)."""
        from engine.backends.sglang_sync import SYNC_TIMEOUT_S, init_custom_process_group

        name = body.get("group_name", "weight_update_group")
        try:
            self.groups[name] = init_custom_process_group(
                backend=body.get("backend", "nccl"), world_size=int(body["world_size"]), rank=int(body["rank_offset"]),
                group_name=name, timeout_s=SYNC_TIMEOUT_S,
                init_method=f"tcp://{body['master_address']}:{body['master_port']}")
        except Exception as e:  # sglang answers success=false (HTTP 400) with the error
            return {"success": False, "message": f"Failed to initialize custom process group: {e}."}
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def begin_session(self, begin: bool) -> dict:
        if begin == self.session:
            return {"success": False, "message": "a weight-update session is already open; call "
                    "end_weight_update() first" if begin else "no weight-update session is open; call "
                    "begin_weight_update() first"}
        self.session = begin
        return {"success": True, "message": "Success"}

    def update_distributed(self, body: dict) -> dict:
        """``/update_weights_from_distributed``: receive the bucket, then load it as ``/update_weights_from_disk``
        loads a folder (the received tensors replace theirs in the checkpoint-layout state; transformers reads it)."""
        import torch.distributed as dist

        if not self.session:
            return {"success": False, "message": "update_weights_from_distributed must run between "
                    "begin_weight_update() and end_weight_update()"}
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:
            return {"success": False, "message": f"Group {name} not in {list(self.groups)}. Please call "
                    "`init_weights_update_group` first."}
        received = {}
        try:
            for tensor_name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                received[tensor_name] = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(received[tensor_name], src=0, group=self.groups[name])
        except Exception as e:
            return {"success": False, "message": f"Failed to receive weights: {e}"}
        if self.faults.update_failures > 0:  # received (the collective stays matched), not loaded
            self.faults.update_failures -= 1
            return {"success": False, "message": "stand-in fault: failed to load the received weights"}
        state = self.checkpoint_state()
        unknown = sorted(set(received) - set(state))
        if unknown:
            return {"success": False, "message": f"unknown weight names {unknown[:3]}"}
        self._load_state({**state, **received}, body.get("weight_version"))
        return {"success": True, "message": "Succeeded to update parameter online."}

    def checkpoint_state(self) -> dict:
        """The served weights in checkpoint names and the config's dtype (what the learner broadcasts)."""
        from engine.backends.sglang_wire import hub_layout, model_dtype

        config = json.loads((Path(self.model_dir) / "config.json").read_text())
        dtype = model_dtype(config)
        with self.lock:
            state = hub_layout(self.model.state_dict(), config)
        return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}

    def _load_state(self, state: dict, version: str | None = None) -> None:
        import shutil
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(Path(self.model_dir) / "config.json", Path(tmp) / "config.json")
            save_file(state, str(Path(tmp) / "model.safetensors"))
            new = load_model(tmp).eval()
        with self.lock:
            self.model.load_state_dict(new.state_dict())
            if version is not None:
                self.weight_version = str(version)
            self.prefix_routes.clear()

    def checksums(self) -> dict[str, str]:
        return tensor_checksums(self.checkpoint_state())

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked streams, as uvicorn sends them

            def log_message(self, *args) -> None:
                pass

            def _send(self, obj: dict, code: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, body: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                rid = body.get("rid", "")
                try:
                    for item in standin.generate(body, incremental=standin.incremental):
                        standin.live.add(rid)
                        self._chunk(b"data: " + json.dumps(item).encode() + b"\n\n")
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:  # the client went away (sglang aborts the request), or the stand-in died
                    standin.aborted.add(body.get("rid", ""))
                    self.close_connection = True
                    if standin.dead.is_set():
                        self._drop()
                finally:
                    standin.live.discard(rid)

            def _drop(self) -> None:
                """Close the connection abruptly (a killed process's sockets)."""
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path == "/_progress":  # tests: tokens so far of each request being generated
                    self._send({"live": {rid: standin.progress.get(rid, 0) for rid in list(standin.live)}})
                elif self.path == "/_checksums":  # tests: sha256 of every served weight (checkpoint names)
                    self._send(standin.checksums())
                elif self.path != "/health":
                    self._send({"error": "not found"}, 404)
                elif standin.hung.is_set():  # the socket stays open; no answer comes
                    while standin.hung.is_set() and not standin.closed.is_set():
                        time.sleep(0.05)
                    self.close_connection = True
                else:
                    self._send({}, 503 if standin.silent.is_set() or standin.starting() else 200)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                standin.calls.append(self.path)
                if "weight" in self.path:  # into the launching worker's log (the e2e tests read which path ran)
                    print(f"sglang-standin: POST {self.path}", file=sys.stderr, flush=True)
                if self.path == "/_fault":
                    standin.fault(**body)
                    self._send({})
                elif self.path == "/generate" and (standin.starting() or standin.faults.status_count > 0):
                    if not standin.starting():
                        standin.faults.status_count -= 1
                    standin.failed_requests += 1
                    code = 503 if standin.starting() else standin.faults.status
                    self._send({"error": {"message": f"stand-in fault: HTTP {code}"}}, code)
                elif self.path == "/generate" and "text" in body:  # a judge's text prompts: every verdict a tie
                    texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
                    self._send([{"text": "Verdict: Tie", "meta_info": {"finish_reason": {"type": "stop"}}}
                                for _ in texts])
                elif self.path == "/generate":
                    standin.bodies.append(body)
                    if body.get("stream"):
                        self._stream(body)
                    else:
                        *_, last = standin.generate(body)
                        self._send(last)
                elif self.path == "/pause_generation" and body.get("mode", "abort") not in _PAUSE_MODES:
                    self._send({"error": {"message": f"mode must be one of {_PAUSE_MODES}"}}, 400)
                elif self.path == "/pause_generation":
                    if body.get("mode", "abort") == "abort":  # first: a request between two tokens sees it
                        standin.epoch += 1
                    standin.running.clear()
                    self._send({})
                elif self.path == "/continue_generation":
                    standin.running.set()
                    self._send({})
                elif self.path == "/update_weights_from_disk":
                    result = standin.update(body)
                    self._send(result, 200 if result["success"] else 400)
                elif self.path in _DISTRIBUTED:
                    result = _DISTRIBUTED[self.path](standin, body)
                    self._send(result, 200 if result["success"] else 400)
                elif self.path == "/abort_request":
                    standin.aborted.add(body.get("rid", ""))
                    self._send({})
                else:
                    self._send({"error": "not found"}, 404)

        return Handler


_PAUSE_MODES = ("abort", "retract", "in_place")  # io_struct PauseGenerationReqInput.mode
_DISTRIBUTED = {  # rollout.weight_sync=distributed: path -> handler (every one answers {success, message})
    "/init_weights_update_group": StandIn.init_group,
    "/begin_weight_update": lambda s, body: s.begin_session(True),
    "/end_weight_update": lambda s, body: s.begin_session(False),
    "/update_weights_from_distributed": StandIn.update_distributed,
    "/destroy_weights_update_group": lambda s, body: {"success": s.groups.pop(body.get("group_name"), None) is not None,
                                                       "message": "Success"},
}


def version_segments(versions: list[str]) -> list[dict]:
    """Per-token weight versions -> sglang's ``meta_info.weight_versions`` segments ``{version, start, end}``."""
    segments: list[dict] = []
    for i, v in enumerate(versions):
        if segments and segments[-1]["version"] == v:
            segments[-1]["end"] = i + 1
        else:
            segments.append({"version": v, "start": i, "end": i + 1})
    return segments


def tensor_checksums(state: dict) -> dict[str, str]:
    """name -> sha256 of the tensor's bytes (sglang's weight checker takes the same per-tensor digest)."""
    import hashlib

    return {k: hashlib.sha256(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def fake_sglang_env(tmp_path) -> dict[str, str]:
    """Environment variables under which ``python -m sglang.launch_server ...`` runs this stand-in (a package
    ``sglang`` in ``tmp_path``), so a backend launches (and relaunches) it as its own server."""
    from pathlib import Path

    root = Path(tmp_path) / "fake_sglang"
    (root / "sglang").mkdir(parents=True, exist_ok=True)
    (root / "sglang" / "__init__.py").write_text("")
    (root / "sglang" / "launch_server.py").write_text("from tests.sglang_standin import main\nmain()\n")
    repo = str(Path(__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join([str(root), repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def main(argv: list[str] | None = None) -> None:
    """Serve one stand-in until killed (``--model-path``, ``--port``; sglang's other flags are ignored)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--model-path", required=True)
    p.add_argument("--port", type=int, default=30000)
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    faults = json.loads(os.environ.get("SGLANG_STANDIN_FAULTS") or "{}")
    standin = StandIn(args.model_path, port=args.port, synthetic=True, incremental=True, token_delay_s=0.005,
                      exit_on_death=True)
    standin.fault(**faults)
    standin.closed.wait()


if __name__ == "__main__":
    main()
