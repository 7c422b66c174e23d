"""The training benches' reductions (bench/training.py) and their --task presets (bench/task_presets.py):
pure functions over metrics rows, no run."""

import pytest

from bench.task_presets import PRESETS, TASKS, task_overrides
from bench.training import grad_spikes, run_report, steps_to_plus, summarise_seeds
from configs.load import load


def _steps(norms, espo=True):
    rows = []
    for i, g in enumerate(norms):
        r = {"step": i, "clip_frac": 0.1, "entropy": 0.5 - 0.01 * i, "approx_kl": 0.01, "grad_norm": g,
             "mean_response_tokens": 10.0 + i, "p99_response_tokens": 40.0}
        if espo:
            r.update(clip_frac_upper_hi_ent=0.02, clip_frac_lower_hi_ent=0.03, clip_frac_upper_lo_ent=0.1,
                     clip_frac_lower_lo_ent=0.0, hi_ent_token_frac=0.2)
        rows.append(r)
    return rows


EVALS = [{"event": "eval", "version": 0, "accuracy": 0.30}, {"event": "eval", "version": 10, "accuracy": 0.35},
         {"event": "eval", "version": 20, "accuracy": 0.40}, {"event": "eval", "version": 30, "accuracy": 0.38}]


def test_steps_to_plus10_is_the_first_eval_ten_points_up():
    assert steps_to_plus(EVALS) == 20  # 0.30 + 0.10 reached exactly (float tolerance)
    assert steps_to_plus(EVALS[:2]) is None


def test_grad_spikes_count_steps_over_five_times_the_median():
    assert grad_spikes([{"grad_norm": g} for g in (1, 1, 1, 6, 4.9, 1)]) == (1, 6.0)
    assert grad_spikes([{"grad_norm": g} for g in (0, 0, 0, 1, 1, 6)]) == (1, 6.0)  # no-gradient steps left out
    assert grad_spikes([{"step": 0}, {"grad_norm": 0.0}]) == (0, None)


def test_run_report_per_group_clip_only_for_espo():
    r = run_report(_steps([1.0] * 10), EVALS)
    assert r["eval_accuracy_start"] == 0.30 and r["eval_accuracy_end"] == 0.38 and r["steps_to_plus_10"] == 20
    assert r["clip_frac_hi_ent"] == pytest.approx(0.05) and r["clip_frac_lo_ent"] == pytest.approx(0.1)
    assert r["entropy_end"] == pytest.approx(0.41) and r["mean_response_tokens"] == pytest.approx(14.5)
    assert r["grad_norm_spikes"] == 0 and r["p99_response_tokens"] == 40.0
    other = run_report(_steps([1.0] * 10, espo=False), EVALS)
    assert other["clip_frac_hi_ent"] is None and other["hi_ent_token_frac"] is None


def test_summarise_seeds_keeps_the_old_keys_and_adds_the_issue_names():
    runs = [{"seed": s, **run_report(_steps([1.0] * 4), EVALS[: 3 - s])} for s in range(2)]
    out = summarise_seeds(runs)
    for key in ("eval_accuracy_end", "eval_accuracy_end_std", "eval_accuracy_start", "steps_to_plus_10",
                "seeds_reaching_plus_10", "clip_fraction", "entropy_end", "per_seed"):
        assert key in out
    assert out["acc_end_mean"] == pytest.approx(0.375) and out["acc_end_std"] == pytest.approx(0.025)
    assert out["steps_to_plus10"] == 20 and out["seeds_reaching_plus_10"] == 1


def test_arithmetic_preset_is_todays_behaviour():
    assert task_overrides("arithmetic") == []
    with pytest.raises(KeyError):
        task_overrides("chess")


@pytest.mark.parametrize("task", [t for t in TASKS if t != "arithmetic"])
def test_reasoning_presets_are_valid_configs(task):
    cfg = load(list(PRESETS[task].overrides))
    assert cfg.task.name == task and cfg.task.max_level > cfg.task.min_level
    assert cfg.sft.max_time_s > 600  # the step cap, not a loaded machine's clock, ends SFT
