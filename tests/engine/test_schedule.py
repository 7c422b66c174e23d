"""The length predictor and the scheduler on constructed workloads (pure bookkeeping, no clocks)."""

import pytest

from engine.coordinator.schedule import LengthPredictor, Scheduler


def test_predictor_falls_back_from_prompt_to_source_to_global_to_default():
    p = LengthPredictor(ema=0.5, default=100.0)
    assert p.predict(1, "a") == 100.0  # nothing seen yet
    p.observe(1, "a", [10, 30])
    assert p.predict(1, "a") == 20.0  # the prompt's own mean
    assert p.predict(2, "a") == 20.0  # an unseen prompt of a seen source
    p.observe(3, "b", [60])
    assert p.predict(4, "c") == pytest.approx((10 + 30 + 60) / 3)  # unseen source: mean of every length


def test_predictor_ema_weights_the_newest_epoch():
    p = LengthPredictor(ema=0.25)
    p.observe(7, "s", [100])
    p.observe(7, "s", [200])
    assert p.predict(7, "s") == pytest.approx(0.75 * 100 + 0.25 * 200)


def test_predictor_keeps_the_most_recently_seen_prompts_only():
    """An endless stream of fresh prompts must not grow the coordinator: the table is bounded, the oldest goes."""
    p = LengthPredictor(ema=0.5, max_prompts=3)
    for prompt_id in range(10):
        p.observe(prompt_id, "s", [prompt_id])
    p.observe(7, "s", [7])  # seen again: now the most recent
    p.observe(10, "s", [10])
    assert p.known_prompts == 3
    assert [p.predict(i, "x") for i in (7, 9, 10)] == [7.0, 9.0, 10.0]  # still its own EMA
    assert p.predict(8, "x") == pytest.approx((sum(range(10)) + 7 + 10) / 12)  # evicted: the mean of every length


def test_length_aware_orders_longest_predicted_first_and_fifo_keeps_arrival():
    pred = LengthPredictor()
    for prompt, length in ((0, 10), (1, 500), (2, 50)):
        pred.observe(prompt, "s", [length])
    groups = [(0, "s", 8), (1, "s", 8), (2, "s", 8)]
    assert Scheduler("length_aware", pred).order(groups) == [1, 2, 0]
    assert Scheduler("fifo", pred).order(groups) == [0, 1, 2]


def _assign(sched: Scheduler, workers: list[str], groups: list[tuple[int, str, int]]) -> dict[str, float]:
    """Dispatch the groups as engine/coordinator/dispatch.py does; returns each worker's true total tokens."""
    for w in workers:
        sched.add_worker(w)
    true_tokens = {w: 0.0 for w in workers}
    for i in sched.order(groups):
        prompt, source, n = groups[i]
        w = sched.pick(workers)
        sched.load[w] += sched.cost(prompt, source, n)
        true_tokens[w] += n * LENGTHS[prompt]
    return true_tokens


LENGTHS = {p: (1000 if p % 10 == 0 else 50) for p in range(40)}  # a long tail: every tenth prompt is 20x longer


def test_length_aware_balances_a_long_tailed_workload_better_than_fifo():
    pred = LengthPredictor()
    for p, n in LENGTHS.items():  # an earlier epoch
        pred.observe(p, "s", [n])
    groups = [(p, "s", 4) for p in range(40)]
    workers = ["w0", "w1", "w2", "w3"]
    fifo = _assign(Scheduler("fifo", pred), workers, groups)
    lpt = _assign(Scheduler("length_aware", pred), workers, groups)
    assert sum(fifo.values()) == sum(lpt.values())
    # fifo is round-robin here: prompts 0, 20 (w0) and 10, 30 (w2) pile up the long ones on two workers
    assert max(fifo.values()) - min(fifo.values()) >= 4000
    assert max(lpt.values()) - min(lpt.values()) <= 200  # LPT: each worker gets one long prompt
    assert max(lpt.values()) < max(fifo.values())


def test_fifo_picks_the_worker_with_fewest_outstanding_samples():
    s = Scheduler("fifo")
    for w in ("a", "b"):
        s.add_worker(w)
    s.load["a"] += s.cost(0, "", 8)
    assert s.pick(["a", "b"]) == "b"
    s.remove_worker("b")
    assert s.pick(["a"]) == "a"


def test_unknown_policy_is_rejected_with_the_key():
    with pytest.raises(ValueError, match="rollout.schedule"):
        Scheduler("random")
