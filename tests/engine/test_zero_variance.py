"""Zero-variance elimination, stage by stage, on constructed cases (ALGORITHMS.md B.2): the offline pool
filter, reward shaping (and the raw-vs-shaped trap), RL-ZVP signs, and the variance-aware buffer."""

import json

import numpy as np
import pytest

from engine.coordinator.batch import batch_stats, pack_batch
from engine.coordinator.buffer import Group, GroupBuffer, Sample, priority
from engine.data.pool import main as filter_pool, select
from engine.algo.shaping import (Shaping, is_zero_variance, overlong_penalty, partial_credit, repetition_penalty,
                            reward_parts, shaped_reward)
from transport import run

pytestmark = pytest.mark.timeout(120)


def _group(gid: str, correct: list[float], *, rewards: list[float] | None = None, version: int = 0,
           lengths: list[int] | None = None) -> Group:
    g = Group(group_id=gid, prompt_id=int(gid[1:]), prompt_ids=np.array([1, 5, 6], np.int32), answer="7",
              num_samples=len(correct))
    for i, c in enumerate(correct):
        n = (lengths or [2] * len(correct))[i]
        g.samples[i] = Sample(sample_index=i, token_ids=np.full(n, 9, np.int32),
                              behavior_logprobs=np.full(n, -1.0, np.float32),
                              token_versions=np.full(n, version, np.int32), finish_reason="stop",
                              reward=(rewards or correct)[i], valid=True, reward_parts={"correct": c})
    return g


def test_reward_parts_and_shaping():
    assert partial_credit("225", "225") == 1.0 and partial_credit("215", "225") == pytest.approx(2 / 3)
    assert partial_credit("2250", "225") == pytest.approx(3 / 4)  # extra characters count against
    assert [overlong_penalty(n, 8, 2) for n in (5, 6, 7, 8, 9)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert repetition_penalty([1, 2, 3, 4, 5], 2) == 0.0
    assert repetition_penalty([7, 7, 7, 7, 7], 2) == pytest.approx(-0.75)  # 4 bigrams, 1 distinct
    shaping = Shaping(graded=True, overlong_coef=0.5, repetition_coef=0.5, repetition_ngram=2)
    parts = reward_parts(correct=0.0, response="215", reference="225", tokens=[3, 3, 3, 3, 3, 3, 3, 2],
                         max_length=8, shaping=shaping)
    assert parts["correct"] == 0.0 and parts["partial"] == pytest.approx(2 / 3) and parts["overlong"] == -1.0
    assert shaped_reward(parts, shaping) == pytest.approx(2 / 3 - 0.5 + 0.5 * parts["repetition"])
    assert shaped_reward(parts, Shaping()) == 0.0  # no shaping: the raw correctness


def test_raw_vs_shaped_reward_trap():
    """All four answers are correct; a length penalty makes their shaped rewards differ. The group still has
    zero variance for every decision (no correctness signal) while its advantages carry the penalty."""
    g = _group("g1", [1.0] * 4, rewards=[1.0, 0.9, 0.8, 1.0], lengths=[2, 3, 4, 2])
    assert is_zero_variance([s.reward_parts["correct"] for s in g.ordered()])
    assert not is_zero_variance([s.reward for s in g.ordered()])
    batch = pack_batch([g], step=1, pad_id=0)
    assert batch.zvp_sign.tolist() == [0] * 4 and np.abs(batch.advantages).sum() > 0  # shaped: informative
    stats = batch_stats([g], batch, learner_version=0, rl_zvp=True)
    assert stats["zv_rate_raw"] == 1.0 and stats["zv_rate_shaped"] == 0.0 and stats["wasted_sample_frac"] == 0.0


def test_rl_zvp_signs_and_per_stage_rates():
    groups = [_group("g1", [1, 1, 1, 1]), _group("g2", [0, 0, 0, 0]), _group("g3", [1, 0, 0, 1])]
    batch = pack_batch(groups, step=1, pad_id=0)
    assert batch.zvp_sign.tolist() == [1] * 4 + [-1] * 4 + [0] * 4
    assert np.all(batch.advantages[:8] == 0) and np.all(batch.advantages[8:] != 0)
    off = batch_stats(groups, batch, learner_version=0, rl_zvp=False)
    on = batch_stats(groups, batch, learner_version=0, rl_zvp=True)
    assert off["zv_rate_raw"] == off["zv_rate_shaped"] == off["zv_rate_final"] == pytest.approx(2 / 3)
    assert off["wasted_sample_frac"] == pytest.approx(8 / 12)
    assert on["zv_rate_final"] == 0.0 and on["wasted_sample_frac"] == 0.0


def test_rl_zvp_sign_is_zero_for_verifier_invalid_responses():
    """Eq. 11 gives an invalid response 0, and so does RL-ZVP (engine/algo/advantages.py::rl_zvp_advantages): the
    zero-variance sign is the group's, but only its valid members carry it (issue 19, defect 1)."""
    g = _group("g1", [1, 1, 1, 1])
    g.samples[2].valid, g.samples[2].reward = False, float("nan")
    h = _group("g2", [0, 0, 0])
    h.samples[0].valid = False
    batch = pack_batch([g, h], step=1, pad_id=0)
    assert batch.zvp_sign.tolist() == [1, 1, 0, 1, 0, -1, -1]
    assert np.all(batch.advantages == 0)


def test_offline_filter_selects_by_pass_rate():
    rates = [1.0, 0.0, 0.5, 0.95, 0.25]
    assert select(rates, max_pass_rate=1.0, drop_unsolved=False) == [False, True, True, True, True]
    assert select(rates, max_pass_rate=0.9, drop_unsolved=True) == [False, False, True, False, True]


def test_filter_pool_resumes_from_its_progress_file(tmp_path):
    """A pool whose pass rates are already known (an interrupted run's progress file): nothing is recomputed,
    the known rates decide, and the kept prompts carry them."""
    pool = tmp_path / "in.jsonl"
    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)[::-1]} for a in range(10, 15)]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    known = [1.0, 0.0, 0.5, 1.0, 0.25]
    (tmp_path / "out.jsonl.progress.jsonl").write_text(
        "".join(json.dumps({"i": i, "pass_rate": r}) + "\n" for i, r in enumerate(known)) + '{"i": 4, "pa')
    code = filter_pool(["--out", str(out), "--pool", str(pool), "--model", str(tmp_path / "no-model-needed"),
                        "--drop-unsolved", "--config-name", "tiny", f"sft.cache_dir={tmp_path}"])
    assert code == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(k["prompt"], k["pass_rate"]) for k in kept] == [("12+1=", 0.5), ("14+1=", 0.25)]
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert (stats["pool"], stats["kept"], stats["dropped_solved"], stats["dropped_unsolved"]) == (5, 2, 2, 1)


def test_variance_buffer_prefers_informative_groups_and_never_passes_the_bound():
    flat, spread, old = _group("g1", [1, 1, 1, 1], version=3), _group("g2", [1, 0, 1, 0], version=3), \
        _group("g3", [1, 1, 1, 1], version=2)
    assert priority(spread, newest_version=3, staleness_weight=0.1) > priority(flat, newest_version=3,
                                                                                staleness_weight=0.1)

    async def take(order: str, min_version: int) -> list[str]:
        buf = GroupBuffer(order=order)
        for g in (flat, old, spread):
            buf.put(g)
        return [g.group_id for g in await buf.take(2, min_version=min_version)]

    assert run(take("fifo", 2)) == ["g3", "g1"]  # oldest first
    assert run(take("variance", 2)) == ["g3", "g2"]  # g3 is at the bound: it goes now; then the spread
    assert run(take("variance", 1)) == ["g2", "g1"]  # nothing at the bound: informative first


def test_dr_grpo_advantages_are_not_divided_by_the_group_std():
    from engine.algo.loss_registry import LOSSES

    g = _group("g1", [1, 0, 0, 0])  # mean 0.25: R - mean = 0.75, -0.25 (GRPO divides these by the std)
    assert not LOSSES["dr_grpo"].adv_scale_by_std and LOSSES["espo"].adv_scale_by_std
    plain = pack_batch([g], step=1, pad_id=0, scale_by_std=False).advantages
    np.testing.assert_allclose(plain, [0.75, -0.25, -0.25, -0.25], atol=1e-6)
    scaled = pack_batch([g], step=1, pad_id=0).advantages
    assert abs(scaled[0]) > 1.0  # 0.75 / std 0.433


def test_run_totals_stay_one_size_over_an_endless_stream_and_old_checkpoints_load():
    """RunStats goes into every checkpoint: fresh prompts every step must not grow it (nor the coordinator)."""
    from engine.coordinator.batch import RunStats

    totals = RunStats()
    sizes = []
    for step in range(200):
        groups = [_group(f"g{1_000_000 + 8 * step + i}", [1.0, 0.0, 1.0, 1.0]) for i in range(8)]  # fresh ids
        totals.add(groups, batch_stats(groups, pack_batch(groups, step=step, pad_id=0), learner_version=step))
        sizes.append(len(json.dumps(totals.to_dict())))
    assert totals.samples == 200 * 8 * 4 and sizes[-1] - sizes[10] <= 4  # a few digits more, not 8 entries a step
    legacy = {**totals.to_dict(), "prompts": {"1000000": [1, 4, 3.0, 0]}}  # a checkpoint written before
    assert RunStats.from_dict(legacy).to_dict() == totals.to_dict()
