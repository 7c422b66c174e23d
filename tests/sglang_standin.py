"""A stand-in for an sglang server (sglang cannot run on our machines): the endpoints the rollout backend uses,
answering in sglang's documented format, with the tiny Qwen3-MoE generating for real.

- ``POST /generate`` (``input_ids``, ``sampling_params``, ``return_logprob``, ``return_routed_experts``, ``rid``):
  one token per forward over the whole sequence (no KV cache: slow, simple, exact), ``output_ids``,
  ``meta_info.output_token_logprobs`` rows ``[logprob, token_id, None]``, ``meta_info.routed_experts`` base64
  int32 ``[seqlen - 1, layers, k]`` and ``meta_info.finish_reason.type`` (stop | length | abort).
- ``POST /pause_generation`` with mode ``abort``: requests in flight return at once with what they have
  (finish_reason abort); new ones wait until ``POST /continue_generation``.
- ``POST /update_weights_from_disk`` (``model_path``: a save_pretrained-layout folder) -> ``{"success": ...}``.
- ``POST /abort_request`` (``rid``), ``GET /health``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from engine.modeling.model import load_model
from engine.modeling.routing import route_hooks


class StandIn:
    def __init__(self, model_dir: str, *, seed: int = 0, token_delay_s: float = 0.01) -> None:
        self.model = load_model(model_dir).eval()
        self.lock = threading.Lock()  # one forward at a time; weights swap under it
        self.running = threading.Event()
        self.running.set()
        self.epoch = 0  # bumped by every abort-mode pause: requests of an older epoch stop
        self.aborted: set[str] = set()
        self.gen = torch.Generator().manual_seed(seed)
        self.token_delay_s = token_delay_s
        self.weight_version = "0"
        self.calls: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def generate(self, body: dict) -> dict:
        self.running.wait()
        epoch, rid = self.epoch, body.get("rid", "")
        prompt = list(body["input_ids"])
        sp = body["sampling_params"]
        temperature, stops = float(sp["temperature"]), set(sp.get("stop_token_ids", []))
        tokens, logprobs, routes, reason = [], [], None, "length"
        for _ in range(int(sp["max_new_tokens"])):
            if epoch != self.epoch or rid in self.aborted:
                reason = "abort"
                break
            with self.lock, torch.no_grad(), route_hooks(self.model) as log:
                logits = self.model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].float()
                logp = torch.log_softmax(logits / temperature, dim=-1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
            routes = log.stacked(0).numpy().astype("<i4")  # every fed position: prompt + tokens so far
            tokens.append(tok)
            logprobs.append(float(logp[tok]))
            if tok in stops:
                reason = "stop"
                break
            time.sleep(self.token_delay_s)
        meta = {"id": rid, "finish_reason": {"type": reason}, "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens), "weight_version": self.weight_version,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens)]}
        if body.get("return_routed_experts"):
            seqlen_1 = len(prompt) + len(tokens) - 1
            rows = routes[:seqlen_1] if routes is not None else np.zeros((0,), "<i4")
            meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(rows).tobytes()).decode()
        return {"text": "", "output_ids": tokens, "meta_info": meta}

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
            def log_message(self, *args) -> None:
                pass

            def _send(self, obj: dict, code: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send({}) if self.path == "/health" else self._send({"error": "not found"}, 404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                standin.calls.append(self.path)
                if self.path == "/generate":
                    self._send(standin.generate(body))
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
