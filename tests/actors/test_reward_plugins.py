"""The reward worker process with plugins and the judge, over loopback ZeroMQ: failures are recorded, the worker
keeps serving, and a group judged by the tiny model comes back with every failure counted."""

import numpy as np
import pytest

from tests.actors.test_workers import _recv, _setup, actor_process
from transport import Judged, JudgeRequest, ScoreRequest, Scored, run

pytestmark = pytest.mark.timeout(120)


def test_reward_worker_records_plugin_failures_and_keeps_serving(tmp_path):
    _, task, _ = _setup(tmp_path, "reward.plugin=tests.plugin_fixtures:misbehave", "reward.plugin_timeout_s=1",
                        "reward.plugin_processes=2")
    tok = task.tokenizer

    async def scenario():
        async with actor_process(tmp_path, "actors.reward_worker", "--init", str(tmp_path / "init"),
                                 role="reward") as (hub, child, peer):
            for i, text in enumerate(["hang", "raise", "crash", "fine", "fine"]):
                ids = np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int32)
                await hub.send(peer, ScoreRequest(sample_key=f"g/{i}", token_ids=ids, answer="x"))
            got = {s.sample_key: s for s in [await _recv(hub, Scored, child) for _ in range(5)]}
            assert got["g/0"].reward_parts == {"plugin_timeout": 1.0} and not got["g/0"].valid
            assert got["g/1"].reward_parts == {"plugin_error": 1.0} and not got["g/1"].valid
            assert got["g/2"].reward_parts == {"plugin_crash": 1.0} and not got["g/2"].valid
            assert got["g/3"].valid and got["g/4"].valid and got["g/3"].reward_parts["correct"] == 1.0

    run(scenario())


def test_reward_worker_judges_a_group_with_the_tiny_model(tmp_path):
    _, task, _ = _setup(tmp_path, "reward.plugin=judge", "reward.judge.max_calls_per_group=4",
                        "reward.plugin_processes=1")
    tok = task.tokenizer
    ex = task.eval_set[0]
    responses = [ex.answer, ex.answer + "1", "7", ex.answer]
    ids = [tok.encode(r) + [tok.eos_id] for r in responses]

    async def scenario():
        async with actor_process(tmp_path, "actors.reward_worker", "--init", str(tmp_path / "init"),
                                 role="reward") as (hub, child, peer):
            await hub.send(peer, JudgeRequest(
                group_id="g7", prompt_ids=np.asarray(task.prompt_ids(ex), dtype=np.int32),
                token_ids=np.asarray(sum(ids, []), dtype=np.int32),
                offsets=np.cumsum([0] + [len(i) for i in ids]).astype(np.int32), sample_indices=[0, 1, 2, 3],
                answer=ex.answer, request_id=5))
            j = await _recv(hub, Judged, child)
            assert j.group_id == "g7" and j.request_id == 5 and j.sample_indices == [0, 1, 2, 3]
            assert j.parts["judge_calls"] == 4  # the budget: 4 of the 6 pairs
            # the untrained model rarely emits a verdict: every unparseable one is counted, never a crash
            assert j.parts["judge_parse_failures"] + j.parts["judge_pairs"] >= 1
            assert j.parts["judge_parse_failures"] <= 4
            assert len(j.rewards) == 4 and all(-1 <= r <= 1 for r in j.rewards)
            assert all(r == 0.0 for r, v in zip(j.rewards, j.valid) if not v)

    run(scenario())
