"""Rollout worker: generates groups with a backend and sends every finished response back at once.

consumes: GenerateRequest, LoadWeights, Shutdown (coordinator)
produces: Completion (one per response, with behaviour log-probs, the policy version of every token and, when
          asked, the MoE routes: the group's prompt routes ride on its first completion), WeightsLoaded
blocks on: the backend's generate, run in a thread so heartbeats keep flowing

Requests queue up while a batch is being generated; the next batch takes as many whole groups as fit in
``rollout.max_batch_samples`` (one temperature per batch). New weights are applied between batches, and every
token records the version that produced it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque

import numpy as np
import structlog
import torch

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from configs.schema import RunConfig
from engine.model import Generated, generate, load_model, load_weights
from engine.tasks import build_task
from transport import Completion, GenerateRequest, LoadWeights, Peer, Shutdown, WeightsLoaded

log = structlog.get_logger()


class HFBackend:
    """transformers model on the CPU (the embedded default), sampling with a hand-written KV-cache loop."""

    def __init__(self, init_dir: str, *, seed: int, eos_id: int, pad_id: int) -> None:
        self.model = load_model(init_dir).eval()
        self._gen = torch.Generator().manual_seed(seed)
        self.eos_id, self._pad_id = eos_id, pad_id

    def load(self, path: str) -> None:
        load_weights(self.model, path)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 capture_routes: bool = False) -> list[Generated]:
        return generate(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        eos_id=self.eos_id, pad_id=self._pad_id, generator=self._gen, capture_routes=capture_routes)


class RolloutWorker:
    def __init__(self, peer: Peer, backend: HFBackend, *, worker_id: int, max_batch_samples: int) -> None:
        self._peer, self._backend = peer, backend
        self._worker_id, self._max_batch_samples = worker_id, max_batch_samples
        self._queue: deque[GenerateRequest] = deque()
        self._weights: LoadWeights | None = None  # newest weights not yet applied
        self._wake = asyncio.Event()
        self.version = 0

    async def serve(self) -> None:
        await self._peer.start()
        try:
            async with asyncio.TaskGroup() as tg:
                gen = tg.create_task(self._generate_loop())
                await self._receive_loop()  # returns on Shutdown
                gen.cancel()
        finally:
            await self._peer.close()

    async def _receive_loop(self) -> None:
        while True:
            msg = await self._peer.recv()
            match msg:
                case GenerateRequest():
                    self._queue.append(msg)
                case LoadWeights():
                    if self._weights is None or msg.version > self._weights.version:
                        self._weights = msg
                case Shutdown():
                    return
                case _:
                    log.warning("rollout.unexpected_message", type=type(msg).__name__)
                    continue
            self._wake.set()

    async def _generate_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._weights is not None or self._queue:
                if self._weights is not None:  # the newest weights, before every batch
                    await self._apply_weights()
                if self._queue:
                    await self._generate_batch(self._next_batch())

    async def _apply_weights(self) -> None:
        msg, self._weights, t0 = self._weights, None, time.monotonic()
        await asyncio.to_thread(self._backend.load, msg.path)
        self.version = msg.version
        await self._peer.send(WeightsLoaded(version=msg.version, worker_id=self._worker_id,
                                            load_s=time.monotonic() - t0))

    def _next_batch(self) -> list[GenerateRequest]:
        """Whole groups of one temperature, up to max_batch_samples sequences (at least one group)."""
        batch = [self._queue.popleft()]
        n = batch[0].num_samples
        while self._queue and self._queue[0].temperature == batch[0].temperature \
                and n + self._queue[0].num_samples <= self._max_batch_samples:
            n += self._queue[0].num_samples
            batch.append(self._queue.popleft())
        return batch

    async def _generate_batch(self, requests: list[GenerateRequest]) -> None:
        prompts = [r.prompt_ids.tolist() for r in requests for _ in range(r.num_samples)]
        version = self.version
        outputs = await asyncio.to_thread(self._backend.generate, prompts, max_new_tokens=max(
            r.max_new_tokens for r in requests), temperature=requests[0].temperature,
            capture_routes=any(r.return_routes for r in requests))
        i = 0
        for r in requests:
            for k in range(r.num_samples):
                out = outputs[i]
                i += 1
                token_ids, logprobs = out.token_ids[:r.max_new_tokens], out.logprobs[:r.max_new_tokens]
                stopped = bool(token_ids) and token_ids[-1] == self._backend.eos_id
                routes = {}
                if r.return_routes:  # prompt routes once per group: with its first completion
                    routes["routes"] = out.routes[:max(len(token_ids) - 1, 0)]
                    if k == 0:
                        routes["prompt_routes"] = out.prompt_routes
                await self._peer.send(Completion(
                    group_id=r.group_id, sample_index=k, prompt_id=r.prompt_id,
                    token_ids=np.asarray(token_ids, dtype=np.int32),
                    behavior_logprobs=np.asarray(logprobs, dtype=np.float32),
                    token_versions=np.full(len(token_ids), version, dtype=np.int32),
                    finish_reason="stop" if stopped else "length", worker_id=self._worker_id, **routes))


def _build(cfg: RunConfig, init_dir: str, worker_id: int) -> HFBackend:
    torch.set_num_threads(cfg.rollout.threads_per_worker)  # processes sharing a machine must split its cores
    tok = build_task(cfg.task).tokenizer
    return HFBackend(init_dir, seed=cfg.seed * 1000 + worker_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def main(argv: list[str] | None = None) -> int:
    p = actor_parser("everyprompt-rollout-worker", __doc__)
    p.add_argument("--init", required=True, help="HF save_pretrained folder with the initial (version 0) policy")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "rollout")
    backend = _build(cfg, args.init, args.worker_id)
    worker = RolloutWorker(make_peer(args, cfg, "rollout"), backend, worker_id=args.worker_id,
                           max_batch_samples=cfg.rollout.max_batch_samples)
    return run_actor(worker.serve(), "rollout")


if __name__ == "__main__":
    sys.exit(main())
