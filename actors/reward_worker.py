"""Reward worker: detokenizes and verifies each response as soon as it finishes; judges whole groups.

consumes: ScoreRequest (one per finished response), JudgeRequest (one per complete group, reward.plugin=judge),
          Shutdown (coordinator)
produces: Scored, Judged
blocks on: nothing: every response goes to the plugin pool (engine/rewards/plugins.py: ``reward.plugin_processes``
           processes, a per-call timeout, hung or dead processes replaced) as soon as it arrives, and the judge
           generates in a thread, so heartbeats keep flowing

The reward is shaped as configured (``reward.*``: graded partial credit, soft overlong and n-gram repetition
penalties, engine/algo/shaping.py); every part, the raw ``correct`` included, travels in ``reward_parts``. A plugin
that raises, times out or crashes yields ``valid=False`` (the response is left out of the advantage statistics)
with the reason as a part, and the worker keeps serving. With ``reward.plugin=judge`` each response is first
verified by ``reward.judge.verifier`` (its raw correctness), then the coordinator asks for the group's judge
margins (engine/rewards/judge.py), which replace the rewards.
"""

from __future__ import annotations

import asyncio
import sys
import zlib

import structlog

from actors.common import actor_parser, make_peer, run_actor, setup_actor
from configs.schema import RewardConfig
from engine.algo.shaping import reward_parts, shaped_reward
from engine.data.tasks import Task, load_task
from engine.rewards.plugins import PluginPool
from engine.rewards.verifiers import PluginScore
from transport import JudgeRequest, Judged, Peer, ScoreRequest, Scored, Shutdown

log = structlog.get_logger()


def verifier_name(reward: RewardConfig) -> str:
    """The per-response plugin: ``reward.plugin``, or ``reward.judge.verifier`` under the judge."""
    return reward.judge.verifier if reward.plugin == "judge" else reward.plugin


def to_scored(task: Task, msg: ScoreRequest, text: str, verdict: PluginScore, reward: RewardConfig) -> Scored:
    """A plugin's verdict -> Scored with the reward shaped as ``reward`` says and every part (``correct`` = the
    raw verdict)."""
    if not verdict.valid:
        return Scored(sample_key=msg.sample_key, reward=0.0, valid=False, reward_parts=dict(verdict.parts), text=text)
    tokens = msg.token_ids.tolist()
    parts = reward_parts(correct=verdict.score, response=text, reference=msg.answer, tokens=tokens,
                         max_length=task.max_answer_tokens, shaping=reward)
    if verifier_name(reward) != "exact":  # a graded verifier (tests or constraints passed) is its own partial credit
        parts["partial"] = verdict.score
    parts.update(verdict.parts)
    return Scored(sample_key=msg.sample_key, reward=shaped_reward(parts, reward), valid=True, reward_parts=parts,
                  text=text)


class RewardWorker:
    def __init__(self, peer: Peer, task: Task, pool: PluginPool, reward: RewardConfig, *, judge=None) -> None:
        self._peer, self._task, self._pool, self._reward = peer, task, pool, reward
        self._judge = judge  # the judge backend when reward.plugin=judge
        self._judge_lock = asyncio.Lock()  # one group at a time through the judge model
        self._tasks: set[asyncio.Task] = set()

    async def serve(self) -> None:
        await self._peer.start()
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    msg = await self._peer.recv()
                    match msg:
                        case ScoreRequest():
                            self._track(tg.create_task(self._score(msg)))
                        case JudgeRequest():
                            self._track(tg.create_task(self._judge_group(msg)))
                        case Shutdown():
                            for t in self._tasks:
                                t.cancel()
                            break
                        case _:
                            log.warning("reward.unexpected_message", type=type(msg).__name__)
        finally:
            self._pool.close()
            await self._peer.close()

    def _track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _score(self, msg: ScoreRequest) -> None:
        text = self._task.tokenizer.decode(msg.token_ids.tolist())
        verdict = await self._pool.score(text, msg.answer)
        await self._peer.send(to_scored(self._task, msg, text, verdict, self._reward))

    async def _judge_group(self, msg: JudgeRequest) -> None:
        from engine.rewards.judge import judge_group

        tok = self._task.tokenizer
        ids = msg.token_ids.tolist()
        responses = [tok.decode(ids[a:b]) for a, b in zip(msg.offsets[:-1].tolist(), msg.offsets[1:].tolist())]
        num = len(msg.sample_indices)
        try:
            if self._judge is None:
                raise RuntimeError("this reward worker has no judge: set reward.plugin=judge")
            async with self._judge_lock:
                out = await asyncio.to_thread(judge_group, self._judge, self._reward.judge,
                                              question=tok.decode(msg.prompt_ids.tolist()),
                                              responses=responses, reference=msg.answer,
                                              seed=zlib.crc32(msg.group_id.encode()))
            rewards, valid, parts = out.rewards, out.valid, out.parts
        except Exception as e:  # an actor boundary: a failing judge is a recorded failure, not a dead worker
            log.warning("reward.judge_failed", group_id=msg.group_id, error=repr(e))
            rewards, valid, parts = [0.0] * num, [False] * num, {"judge_error": 1.0}
        await self._peer.send(Judged(group_id=msg.group_id, sample_indices=list(msg.sample_indices),
                                     rewards=[float(r) for r in rewards], valid=[bool(v) for v in valid],
                                     parts=parts, request_id=msg.request_id))


def main(argv: list[str] | None = None) -> int:
    p = actor_parser("everyprompt-reward-worker", __doc__)
    p.add_argument("--init", default=None, help="the run's initial policy (the default judge model)")
    args = p.parse_args(argv)
    cfg = setup_actor(args, "reward")
    r = cfg.reward
    task = load_task(cfg)
    pool = PluginPool(verifier_name(r), {"sandbox": r.sandbox}, num_procs=r.plugin_processes,
                      timeout_s=r.plugin_timeout_s)
    judge = None
    if r.plugin == "judge":
        from engine.backends.registry import build_judge
        judge = build_judge(cfg, args.init, task.tokenizer)
    worker = RewardWorker(make_peer(args, cfg, "reward"), task, pool, r, judge=judge)
    return run_actor(worker.serve(), "reward")


if __name__ == "__main__":
    sys.exit(main())
