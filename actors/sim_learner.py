"""A simulated learner for benchmarks: the learner protocol (TrainBatch -> TrainResult, SaveCheckpoint ->
CheckpointSaved) with the time of a training step taken from the cost model instead of computed.

consumes: TrainBatch, SaveCheckpoint, Shutdown (coordinator)   produces: TrainResult, CheckpointSaved
blocks on: nothing (a step is an asyncio sleep of engine/simulate.py's ``train_seconds`` x ``sim.time_scale``)

A step costs ``sim.train_base_s + tokens * sim.train_per_token_s`` over the batch's prompt + response tokens.
No weights are written: the result names ``weights/policy_v{k}.safetensors`` and the simulated rollout
workers only charge ``sim.load_s`` for it. Started by engine/cluster.py when ``sim.learner=true``.
"""

from __future__ import annotations

import asyncio
import sys

import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from configs.schema import SimConfig
from engine import simulate
from transport import CheckpointSaved, SaveCheckpoint, Shutdown, TrainBatch, TrainResult

log = structlog.get_logger()


async def serve(peer, sim: SimConfig, weights_dir: str) -> None:
    await peer.start()
    version = 0
    try:
        while True:
            msg = await peer.recv()
            match msg:
                case TrainBatch():
                    tokens = int(msg.prompt_lens.sum() + msg.response_lens.sum())
                    seconds = simulate.train_seconds(tokens, sim)
                    await asyncio.sleep(seconds * sim.time_scale)
                    version += 1
                    await peer.send(TrainResult(step=msg.step, version=version,
                                                weights_path=f"{weights_dir}/policy_v{version}.safetensors",
                                                stats={"tokens": float(tokens), "train_s": seconds}))
                case SaveCheckpoint():
                    await peer.send(CheckpointSaved(step=msg.step, path=msg.path))
                case Shutdown():
                    return
                case _:
                    log.warning("sim_learner.unexpected_message", type=type(msg).__name__)
    finally:
        await peer.close()


def main(argv: list[str] | None = None) -> int:
    p = actor_parser("everyprompt-sim-learner", __doc__)
    p.add_argument("--weights-dir", default="weights")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "learner")
    return run_actor(serve(make_peer(args, cfg, "learner"), cfg.sim, args.weights_dir), "learner")


if __name__ == "__main__":
    sys.exit(main())
