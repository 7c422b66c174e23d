"""The simulated rollout backend (``rollout.backend=sim``): benchmarks at cluster scale on a CPU.

Each simulated worker is a real ``RolloutWorker`` (actors/rollout_worker.py) with its own ZeroMQ socket, Hello,
heartbeats, streaming chunks, in-flight weight updates and cancellation: only generation is simulated. A
``SimBatch`` is the ``RolloutBatch`` (engine/backends/base.py) in place of ``DecodeBatch``: a decode step appends
one deterministic token to every running response, and the time it would have taken (engine/backends/simulate.py's
cost model) is slept, scaled by ``sim.time_scale``, instead of computed. Lengths come from the workload
(engine/backends/simulate.py), so the same prompt has the same typical length in every epoch.

One process (``main``: the cluster launches this module, engine/backends/registry.py) hosts
``sim.workers_per_process`` workers on one event loop and imports neither torch nor transformers, so 64 workers
fit in a few hundred MB on 2 cores.

consumes/produces: as RolloutWorker.   blocks on: nothing (decode time is an asyncio sleep)

    python -m engine.backends.sim --endpoint tcp://127.0.0.1:5555 --config runs/x/config.yaml --worker-id 0 --count 32
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from configs.schema import SimConfig
from engine.backends import simulate
from engine.data.tasks import build_task
from engine.modeling.rows import Row

_BEHAVIOR_LOGPROB = -1.0  # every simulated token's log-prob


class SimBatch:
    """The ``RolloutBatch`` contract (engine/backends/base.py) over simulated responses.
    ``elapsed_s`` accumulates the simulated cost of everything done so far."""

    def __init__(self, sim: SimConfig, *, eos_id: int, vocab_size: int) -> None:
        self._sim, self._eos_id, self._vocab_size = sim, eos_id, vocab_size
        self.rows: list[Row] = []
        self._plan: dict[int, tuple[np.ndarray, str]] = {}  # id(row) -> (its whole response, finish reason)
        self._prefilled: dict[str, None] = {}  # groups whose prompt is cached here (insertion-ordered LRU)
        self.elapsed_s = 0.0
        self._rebuild = False  # sim.prefill_on_add=all: the next step re-prefills the batch (engine/modeling/decode.py)

    @property
    def active(self) -> int:
        return sum(not r.done for r in self.rows)

    def add(self, rows: list[Row]) -> None:
        self._rebuild = self._rebuild or self._sim.prefill_on_add == "all"
        for r in rows:
            group_id, sample_index, prompt_id, _ = r.key
            length = max(simulate.sample_length(prompt_id, group_id, sample_index, r.max_new_tokens, self._sim),
                         len(r.tokens) + 1)
            stop = length < r.max_new_tokens
            tokens = simulate.response_tokens(prompt_id, sample_index, min(length, r.max_new_tokens),
                                              vocab_size=self._vocab_size, eos_id=self._eos_id, stop=stop)
            self._plan[id(r)] = (tokens, "stop" if stop else "length")
            prefill = len(r.tokens)  # a continuation re-reads its prefix
            if group_id not in self._prefilled:
                prefill += len(r.prompt)
                self._prefilled[group_id] = None
                if len(self._prefilled) > 4096:
                    self._prefilled.pop(next(iter(self._prefilled)))
            if self._sim.prefill_on_add == "new":
                self.elapsed_s += prefill * self._sim.prefill_per_token_s
        self.rows.extend(rows)

    def remove(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        for i in gone:
            self._plan.pop(i, None)
        self.rows = [r for r in self.rows if id(r) not in gone]

    def invalidate(self) -> None:
        """New weights with rollout.kv_on_update=recompute: every unfinished response is prefilled again."""
        tokens = sum(len(r.prompt) + len(r.tokens) for r in self.rows if not r.done)
        self.elapsed_s += tokens * self._sim.prefill_per_token_s

    def step(self, version: int) -> None:
        running = [r for r in self.rows if not r.done]
        if not running:
            return
        cost = simulate.step_seconds(len(running), self._sim)
        if self._rebuild:  # one left-padded prefill of every unfinished row, as DecodeBatch rebuilds its cache
            cost += len(running) * max(len(r.prompt) + len(r.tokens) for r in running) * self._sim.prefill_per_token_s
            self._rebuild = False
        self.elapsed_s += cost
        for r in running:
            tokens, reason = self._plan[id(r)]
            n = len(r.tokens)
            r.extend([int(tokens[n])], [_BEHAVIOR_LOGPROB], version, finish=reason if n + 1 == len(tokens) else None)


class SimBackend:
    """The ``RolloutBackend`` contract (engine/backends/base.py), simulated."""

    def __init__(self, sim: SimConfig, *, eos_id: int, vocab_size: int) -> None:
        self._sim, self._eos_id, self._vocab_size = sim, eos_id, vocab_size
        self.batch: SimBatch | None = None
        self._debt_s = 0.0  # wall seconds still to sleep (negative: overslept, paid back next time)

    def new_batch(self, *, capture_routes: bool) -> SimBatch:
        self.batch = SimBatch(self._sim, eos_id=self._eos_id, vocab_size=self._vocab_size)
        return self.batch

    async def load_async(self, path: str, digest: str = "") -> None:
        await asyncio.sleep(self._sim.load_s * self._sim.time_scale)  # the weights file is not read (nor checked)

    async def run_decode(self, decode_chunk) -> None:
        """Run the decode steps at once, then sleep for what they (and any prefill before them) would cost."""
        before = self.batch.elapsed_s
        decode_chunk()
        self._debt_s += (self.batch.elapsed_s - before) * self._sim.time_scale
        if self._debt_s > 0:  # sleep overshoot is paid back from the next sleep, so simulated time does not drift
            t0 = asyncio.get_running_loop().time()
            await asyncio.sleep(self._debt_s)
            self._debt_s -= asyncio.get_running_loop().time() - t0

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        raise ValueError("the simulated backend records no MoE routes: pass rollout.return_routes=false")


def build(cfg, init_dir: str | None, worker_id: int) -> SimBackend:
    """Rollout worker ``worker_id``'s backend (engine/backends/registry.py): no model, nothing read."""
    tok = build_task(cfg.task).tokenizer
    return SimBackend(cfg.sim, eos_id=tok.eos_id, vocab_size=tok.vocab_size)


async def serve_many(workers: list) -> None:
    """Serve every worker on this event loop; returns once each has been told to shut down."""
    async with asyncio.TaskGroup() as tg:
        for w in workers:
            tg.create_task(w.serve())


def main(argv: list[str] | None = None) -> int:
    from actors.common import actor_parser, make_peer, run_actor, setup_actor  # the actor side, for this entry only
    from actors.rollout_worker import RolloutWorker

    p = actor_parser("python -m engine.backends.sim", __doc__)
    p.add_argument("--count", type=int, default=1, help="simulated workers in this process: ids worker-id ...")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "rollout")
    first = args.worker_id
    workers = []
    for i in range(first, first + args.count):
        args.worker_id = i  # make_peer names the peer from it
        workers.append(RolloutWorker(
            make_peer(args, cfg, "rollout"), build(cfg, None, i), worker_id=i,
            max_batch_samples=cfg.rollout.max_batch_samples, chunk_tokens=cfg.rollout.chunk_tokens,
            kv_on_update=cfg.rollout.kv_on_update, capture_routes=False))
    return run_actor(serve_many(workers), "rollout")


if __name__ == "__main__":
    sys.exit(main())
