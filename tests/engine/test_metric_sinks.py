"""Live metrics backends (engine/coordinator/metric_sinks.py): the grouped names, a real TensorBoard event file
read back with tensorboard's EventAccumulator, the start-up check for a backend that is not installed, and the
report.png panels (engine/coordinator/metrics.py)."""

import importlib.util
import json
import sys

import pytest

from configs.load import ConfigError, load
from configs.logging_section import LoggingConfig
from engine.coordinator.metric_sinks import grouped, live_name, open_sinks, resolve_backends
from engine.coordinator.metrics import MetricsWriter, read_metrics, report_panels, write_report
from engine.coordinator.preflight import _metrics_backends

pytestmark = pytest.mark.timeout(60)

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
STEP = {"step": 2, "version": 2, "reward": 0.5, "accuracy": 0.5, "loss": 0.1, "approx_kl": 0.01, "entropy": 2.0,
        "clip_frac_high": 0.0, "zv_rate_raw": 0.25, "step_s": 1.5, "gen_tokens_per_s": 100.0, "inbox_peak": 3,
        "buffer_groups": 4.0, "generated_samples": 64, "staleness_hist": [10, 5], "new_thing": 7,
        "samples_by_worker": {"rollout-0": 40, "rollout-1": 24}, "note": "text", "grad_norm": None}


def test_flat_keys_get_the_verl_style_groups():
    assert [live_name(k) for k in ("reward", "response_len", "generated_samples", "zv_rate_first")] == \
        ["rollout/reward", "rollout/response_len", "rollout/generated_samples", "rollout/zv_rate_first"]
    assert [live_name(k) for k in ("loss", "approx_kl", "entropy_hi_ent", "logprob_gap_k3", "train_tokens_per_s")] \
        == ["train/loss", "train/approx_kl", "train/entropy_hi_ent", "train/logprob_gap_k3",
            "train/train_tokens_per_s"]
    assert [live_name(k) for k in ("step_s", "learner_wait_s", "publish_s", "actor_restarts", "buffer_groups")] == \
        ["timing/step_s", "timing/learner_wait_s", "timing/publish_s", "system/actor_restarts",
         "system/buffer_groups"]
    assert live_name("something_new") == "misc/something_new"


def test_a_record_is_flattened_at_its_step_and_an_eval_at_its_version():
    step, scalars = grouped(STEP)
    assert step == 2 and scalars["rollout/samples_by_worker/rollout-1"] == 24.0
    assert scalars["rollout/staleness_hist/1"] == 5.0 and scalars["misc/new_thing"] == 7.0
    assert "misc/note" not in scalars and "train/grad_norm" not in scalars  # strings and nulls are skipped
    assert grouped({"event": "eval", "version": 3, "accuracy": 0.25, "eval_s": 0.1, "num_prompts": 32}) == \
        (3, {"eval/accuracy": 0.25, "timing/eval_s": 0.1, "eval/num_prompts": 32.0})
    assert grouped({"prompt_ids": [1, 2]}) is None


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed: pip install -e '.[tensorboard]'")
def test_the_tensorboard_event_file_reads_back_under_grouped_names(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load(["logging.backends=[jsonl,tensorboard]"], config_name="tiny")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", sinks=open_sinks(cfg, tmp_path))
    writer.write({"event": "eval", "version": 0, "accuracy": 0.125, "eval_s": 0.2, "num_prompts": 32})
    for step in (1, 2, 3):
        writer.write({**STEP, "step": step, "loss": 0.5 / step})
    writer.close()
    assert [r.get("step") for r in read_metrics(tmp_path / "metrics.jsonl")] == [None, 1, 2, 3]  # flat, unchanged
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss"] == 0.5
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "rollout/reward", "eval/accuracy", "timing/step_s", "system/inbox_peak",
            "rollout/samples_by_worker/rollout-0"} <= set(tags)
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25), (3, 0.1667)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(0, 0.125)]


def test_the_default_backends_add_tensorboard_only_when_it_is_installed(monkeypatch):
    assert resolve_backends(LoggingConfig()) == (["jsonl", "tensorboard"] if HAS_TENSORBOARD else ["jsonl"])
    assert resolve_backends(LoggingConfig(backends=["jsonl"])) == ["jsonl"]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a package as not importable
    assert resolve_backends(LoggingConfig()) == ["jsonl"]


def test_a_backend_asked_for_but_not_installed_stops_the_run_at_preflight(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"logging.backends includes tensorboard but the tensorboard package is "
                                          r"not installed: pip install -e \"\.\[tensorboard\]\""):
        _metrics_backends(load(["logging.backends=[jsonl,tensorboard]"]))
    with pytest.raises(ConfigError, match=r"includes wandb .* pip install -e \"\.\[wandb\]\", or drop wandb"):
        _metrics_backends(load(["logging.backends=[jsonl,wandb]"]))
    _metrics_backends(load([]))  # unset: tensorboard is optional, no error


def test_logging_keys_are_checked_with_one_line_errors():
    cases = (("logging.backends=[jsonl,tb]", "logging.backends[1]='tb' is invalid: choose jsonl, tensorboard or wandb"),
             ("logging.backends=[tensorboard]", "add jsonl, e.g. logging.backends=[jsonl,tensorboard]"),
             ("logging.wandb_mode=on", "logging.wandb_mode='on' is invalid: choose offline or online"))
    for override, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load([override])


def _rows(rewards, accuracies):
    return [{"step": i + 1, "reward": r, "accuracy": a, "entropy": 2.0 - 0.1 * i, "approx_kl": 0.01 * i,
             "response_len": 7.0 + i, "version_lag_mean": 0.5, "version_lag_max": 1, "step_s": 1.0}
            for i, (r, a) in enumerate(zip(rewards, accuracies))]


def test_report_merges_identical_reward_and_accuracy_and_draws_the_new_panels(tmp_path):
    titles = [t for t, _ in report_panels(_rows([0.1, 0.5], [0.1, 0.5]))]
    assert titles[0] == "reward = train accuracy" and "train accuracy" not in titles and "mean reward" not in titles
    titles = [t for t, _ in report_panels(_rows([0.1, 0.45], [0.1, 0.5]))]  # shaped rewards: two panels
    assert titles[:2] == ["mean reward", "train accuracy"]
    assert {"entropy (mean over response tokens)", "KL to the behaviour policy (k3, approx_kl)",
            "response length (tokens)", "staleness (policy versions per token)"} <= set(titles)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"event": "eval", "version": 0, "accuracy": 0.1},
                                                               *_rows([0.1, 0.5, 0.6], [0.1, 0.5, 0.6])]))
    write_report(metrics, tmp_path / "report.png", title="t")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
