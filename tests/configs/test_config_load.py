import pytest

from configs.load import ConfigError, load, load_resolved, save

pytestmark = pytest.mark.timeout(30)


def test_default_config_composes_with_overrides():
    cfg = load(["train.num_steps=7", "learner.num_ranks=2"])
    assert cfg.train.num_steps == 7 and cfg.learner.num_ranks == 2
    assert cfg.model.num_experts == 8 and cfg.model.top_k == 2


@pytest.mark.parametrize("override, expected", [
    ("train.num_stepz=3", "unknown config key 'train.num_stepz': did you mean train.num_steps"),
    ("lerner.lr=1e-3", "did you mean learner"),
    ("train.num_steps=abc", "bad value for 'train.num_steps'"),
    ("model.top_k=20", "model.top_k=20 is invalid"),
    ("rollout.group_size=1", "pass rollout.group_size=8"),
    ("task.name=jsonl", "pass task.jsonl_path="),
    ("train.num_steps", "not of the form key=value"),
    ("reward.plugin=bogus", "reward.plugin='bogus' is invalid: choose exact, math, code, instruction, choice, judge"),
    ("reward.judge.verifier=judge", "the per-response verifier must be a plugin"),
    ("reward.judge.verifier=nope", "reward.judge.verifier='nope' is invalid: choose exact"),
])
def test_bad_config_fails_naming_key_and_fix(override, expected):
    with pytest.raises(ConfigError, match=None) as err:
        load([override])
    assert expected in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load(["train.num_steps=11"], config_name="tiny")
    save(cfg, tmp_path / "config.yaml")
    assert load_resolved(tmp_path / "config.yaml") == cfg
