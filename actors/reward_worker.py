"""Reward worker: detokenizes and verifies each response as soon as it finishes.

consumes: ScoreRequest (coordinator, one per finished sample)   produces: Scored   blocks on: nothing
The reward is shaped as configured (``reward.*``: graded partial credit, soft overlong and n-gram repetition
penalties, engine/rewards.py); every part, the raw ``correct`` included, travels in ``reward_parts``.
A verifier that raises yields ``valid=False`` (the response is left out of the advantage statistics) and the
worker keeps serving.
"""

from __future__ import annotations

import sys

import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from engine.rewards import Shaping, reward_parts, shaped_reward
from engine.tasks import Task, build_task
from transport import ScoreRequest, Scored, Shutdown

log = structlog.get_logger()


def score(task: Task, msg: ScoreRequest, shaping: Shaping = Shaping()) -> Scored:
    """Verify one response -> Scored with the shaped reward and every part (``correct`` = raw 0/1)."""
    tokens = msg.token_ids.tolist()
    text = task.tokenizer.decode(tokens)
    try:
        correct, valid = task.score(text, msg.answer)
        parts = reward_parts(correct=correct, response=text, reference=msg.answer, tokens=tokens,
                             max_length=task.max_answer_tokens, shaping=shaping)
    except Exception as e:  # an actor boundary: a broken verifier is a recorded failure, not a dead worker
        log.warning("reward.verifier_failed", sample_key=msg.sample_key, error=repr(e))
        return Scored(sample_key=msg.sample_key, reward=0.0, valid=False, reward_parts={"verifier_error": 1.0},
                      text=text)
    return Scored(sample_key=msg.sample_key, reward=shaped_reward(parts, shaping), valid=bool(valid),
                  reward_parts=parts, text=text)


async def serve(peer, task: Task, shaping: Shaping = Shaping()) -> None:
    await peer.start()
    try:
        while True:
            msg = await peer.recv()
            match msg:
                case ScoreRequest():
                    await peer.send(score(task, msg, shaping))
                case Shutdown():
                    return
                case _:
                    log.warning("reward.unexpected_message", type=type(msg).__name__)
    finally:
        await peer.close()


def main(argv: list[str] | None = None) -> int:
    args = actor_parser("everyprompt-reward-worker", __doc__).parse_args(argv)
    cfg = setup_actor(args, "reward")
    r = cfg.reward
    shaping = Shaping(graded=r.graded, overlong_coef=r.overlong_coef, overlong_cache=r.overlong_cache,
                      repetition_coef=r.repetition_coef, repetition_ngram=r.repetition_ngram)
    return run_actor(serve(make_peer(args, cfg, "reward"), build_task(cfg.task), shaping), "reward")


if __name__ == "__main__":
    sys.exit(main())
