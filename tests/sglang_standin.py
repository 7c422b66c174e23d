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
  (finish_reason abort); new ones wait until ``POST /continue_generation``.
- ``POST /update_weights_from_disk`` (``model_path``: a save_pretrained-layout folder) -> ``{"success": ...}``.
- ``POST /abort_request`` (``rid``), ``GET /health``.
- ``silence()``: a lost server; streams stay open and send nothing, ``/health`` answers 503.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from engine.modeling.adapters import adapter_for
from engine.modeling.model import load_model
from engine.modeling.routing import route_hooks


def synthetic_route(position: int, layer: int, slot: int, experts: int) -> int:
    return (position + 3 * layer + slot) % experts


class StandIn:
    def __init__(self, model_dir: str, *, seed: int = 0, token_delay_s: float = 0.01, incremental: bool = False,
                 synthetic: bool = False) -> None:
        self.model = load_model(model_dir).eval()
        self.adapter = adapter_for(self.model.config)
        self.lock = threading.Lock()  # one forward at a time; weights swap under it
        self.running = threading.Event()
        self.running.set()
        self.silent, self.closed = threading.Event(), threading.Event()
        self.epoch = 0  # bumped by every abort-mode pause: requests of an older epoch stop
        self.aborted: set[str] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.token_delay_s, self.incremental, self.synthetic = token_delay_s, incremental, synthetic
        self.weight_version = "0"
        self.calls: list[str] = []
        self.bodies: list[dict] = []  # every /generate body
        self.progress: dict[str, int] = {}  # rid -> tokens generated so far
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def silence(self) -> None:
        self.silent.set()

    def _next(self, prompt: list[int], tokens: list[int], temperature: float) -> tuple[int, float, np.ndarray | None]:
        """(next token, its log-prob, routes [every fed position, num_hidden_layers, k]; None when synthetic)."""
        if self.synthetic:
            j = len(tokens)
            return 3 + (7 * j) % (self.model.config.vocab_size - 3), -1.0 - j / 1000, None
        with self.lock, torch.no_grad(), route_hooks(self.model) as log:
            logits = self.model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1)
            tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
        return tok, float(logp[tok]), self._full_layers(log.stacked(0).numpy())

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
        tokens, logprobs, reason, sent = [], [], None, 0
        routes = self._full_layers(np.zeros((0, len(self.adapter.sparse_layers()), self.adapter.top_k), "<i4"))
        while reason is None:
            while self.silent.is_set() and not self.closed.is_set():
                time.sleep(0.05)
            if epoch != self.epoch or rid in self.aborted or self.closed.is_set():
                reason = "abort"
            elif len(tokens) >= int(sp["max_new_tokens"]):
                reason = "length"
            else:
                tok, lp, routes = self._next(prompt, tokens, temperature)
                tokens.append(tok)
                logprobs.append(lp)
                self.progress[rid] = len(tokens)
                reason = "stop" if tok in stops else None
                if reason is None and len(tokens) >= int(sp["max_new_tokens"]):
                    reason = "length"
            lo = sent if incremental else 0
            meta = {"id": rid, "finish_reason": {"type": reason} if reason else None,
                    "prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                    "weight_version": self.weight_version,
                    "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs[lo:], tokens[lo:])]}
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
        try:
            new = load_model(body["model_path"]).eval()
        except Exception as e:  # sglang answers success=false with a message
            return {"success": False, "message": repr(e)}
        with self.lock:
            self.model.load_state_dict(new.state_dict())
        self.weight_version = str(body.get("weight_version", self.weight_version))
        return {"success": True, "message": "ok", "num_paused_requests": 0}

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
                try:
                    for item in standin.generate(body, incremental=standin.incremental):
                        self._chunk(b"data: " + json.dumps(item).encode() + b"\n\n")
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:  # the client went away: sglang aborts the request
                    standin.aborted.add(body.get("rid", ""))
                    self.close_connection = True

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path != "/health":
                    self._send({"error": "not found"}, 404)
                else:
                    self._send({}, 503 if standin.silent.is_set() else 200)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                standin.calls.append(self.path)
                if self.path == "/generate":
                    standin.bodies.append(body)
                    if body.get("stream"):
                        self._stream(body)
                    else:
                        *_, last = standin.generate(body)
                        self._send(last)
                elif self.path == "/pause_generation":
                    standin.running.clear()
                    if body.get("mode", "abort") == "abort":
                        standin.epoch += 1
                    self._send({})
                elif self.path == "/continue_generation":
                    standin.running.set()
                    self._send({})
                elif self.path == "/update_weights_from_disk":
                    self._send(standin.update(body))
                elif self.path == "/abort_request":
                    standin.aborted.add(body.get("rid", ""))
                    self._send({})
                else:
                    self._send({"error": "not found"}, 404)

        return Handler
