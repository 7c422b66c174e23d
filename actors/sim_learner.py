"""A simulated learner for benchmarks: the learner protocol (TrainBatch -> TrainResult, SaveCheckpoint ->
CheckpointSaved) with the time of a training step taken from the cost model instead of computed.

consumes: TrainBatch, SaveCheckpoint, Shutdown (coordinator)   produces: TrainResult, CheckpointSaved
blocks on: nothing (a step is an asyncio sleep of engine/backends/simulate.py's ``train_seconds`` x ``sim.time_scale``)

A step costs ``sim.train_base_s + tokens * sim.train_per_token_s`` over the batch's prompt + response tokens.
The result names ``weights/policy_v{k}.safetensors``. The simulated rollout workers only charge ``sim.load_s``
for it and never read it; with ``sim.weights_file`` set (the bench's ``--backend hf`` sanity run, whose real
workers load every version), that file is published under each version's name (a hard link, else a copy, put in
place atomically), so the weights never change but every load is real (and checked against the file's digest,
taken once). Started by engine/coordinator/cluster.py when ``sim.learner=true``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from configs.schema import SimConfig
from engine.backends import simulate
from engine.backends.weights_file import digest_file
from transport import CheckpointSaved, SaveCheckpoint, Shutdown, TrainBatch, TrainResult

log = structlog.get_logger()


async def serve(peer, sim: SimConfig, weights_dir: str) -> None:
    await peer.start()
    version = 0
    digest = digest_file(sim.weights_file) if sim.weights_file else ""  # every version publishes the same bytes
    try:
        while True:
            msg = await peer.recv()
            match msg:
                case TrainBatch():
                    tokens = int(msg.prompt_lens.sum() + msg.response_lens.sum())
                    seconds = simulate.train_seconds(tokens, sim)
                    await asyncio.sleep(seconds * sim.time_scale)
                    version += 1
                    path = f"{weights_dir}/policy_v{version}.safetensors"
                    if sim.weights_file:
                        publish(sim.weights_file, path)
                    await peer.send(TrainResult(step=msg.step, version=version, weights_path=path,
                                                stats={"tokens": float(tokens), "train_s": seconds},
                                                weights_digest=digest))
                case SaveCheckpoint():
                    await peer.send(CheckpointSaved(step=msg.step, path=msg.path))
                case Shutdown():
                    return
                case _:
                    log.warning("sim_learner.unexpected_message", type=type(msg).__name__)
    finally:
        await peer.close()


def publish(src: str, dst: str) -> None:
    """Put ``src`` in place as ``dst`` atomically (a reader never sees a partial file): a hard link, or a copy
    where links are not possible (another file system)."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(dst).parent, prefix=f".{Path(dst).name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    p = actor_parser("everyprompt-sim-learner", __doc__)
    p.add_argument("--weights-dir", default="weights")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "learner")
    return run_actor(serve(make_peer(args, cfg, "learner"), cfg.sim, args.weights_dir), "learner")


if __name__ == "__main__":
    sys.exit(main())
