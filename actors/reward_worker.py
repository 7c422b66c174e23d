"""Reward worker: detokenizes and verifies each response as soon as it finishes.

consumes: ScoreRequest (coordinator, one per finished sample)   produces: Scored   blocks on: nothing
A verifier that raises yields ``valid=False`` (the response is left out of the advantage statistics) and the
worker keeps serving.
"""

from __future__ import annotations

import sys

import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from engine.tasks import Task, build_task
from transport import ScoreRequest, Scored, Shutdown

log = structlog.get_logger()


def score(task: Task, msg: ScoreRequest) -> Scored:
    text = task.tokenizer.decode(msg.token_ids.tolist())
    try:
        reward, valid = task.score(text, msg.answer)
    except Exception as e:  # an actor boundary: a broken verifier is a recorded failure, not a dead worker
        log.warning("reward.verifier_failed", sample_key=msg.sample_key, error=repr(e))
        return Scored(sample_key=msg.sample_key, reward=0.0, valid=False, reward_parts={"verifier_error": 1.0},
                      text=text)
    return Scored(sample_key=msg.sample_key, reward=float(reward), valid=bool(valid),
                  reward_parts={"correct": float(reward)}, text=text)


async def serve(peer, task: Task) -> None:
    await peer.start()
    try:
        while True:
            msg = await peer.recv()
            match msg:
                case ScoreRequest():
                    await peer.send(score(task, msg))
                case Shutdown():
                    return
                case _:
                    log.warning("reward.unexpected_message", type=type(msg).__name__)
    finally:
        await peer.close()


def main(argv: list[str] | None = None) -> int:
    args = actor_parser("everyprompt-reward-worker", __doc__).parse_args(argv)
    cfg = setup_actor(args, "reward")
    return run_actor(serve(make_peer(args, cfg, "reward"), build_task(cfg.task)), "reward")


if __name__ == "__main__":
    sys.exit(main())
