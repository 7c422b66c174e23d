"""``everyprompt-train --cfg`` prints the resolved config and starts nothing; ``sft.cache_dir`` defaults to
``<out_dir>/.sft_cache``, resolved at load and saved in config.yaml."""

import subprocess
import sys

import pytest
import yaml

from configs.load import load, load_resolved, save
from configs.schema import RunConfig

pytestmark = pytest.mark.timeout(120)


def test_sft_cache_dir_defaults_to_the_out_dir_and_is_saved_resolved(tmp_path):
    assert load([]).sft.cache_dir == "runs/.sft_cache"
    cfg = load([f"out_dir={tmp_path}"])
    assert cfg.sft.cache_dir == f"{tmp_path}/.sft_cache"
    assert load([f"out_dir={tmp_path}", "sft.cache_dir=/elsewhere"]).sft.cache_dir == "/elsewhere"  # as given
    save(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sft"]["cache_dir"] == f"{tmp_path}/.sft_cache"
    assert load_resolved(tmp_path / "config.yaml").sft.cache_dir == f"{tmp_path}/.sft_cache"
    assert RunConfig(out_dir="/data/runs").sft.cache_dir == "/data/runs/.sft_cache"


@pytest.mark.parametrize("flag", ["--cfg", "--print-config"])
def test_print_config_shows_every_key_with_the_overrides_and_starts_nothing(tmp_path, flag):
    out = subprocess.run([sys.executable, "-m", "engine.coordinator", "--config-name", "tiny", flag,
                          f"out_dir={tmp_path}", "train.num_steps=7", "logging.backends=[jsonl]"],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["train"]["num_steps"] == 7 and printed["name"] == "tiny"  # override and preset
    assert printed["model"]["hidden_size"] == 32 and printed["learner"]["espo"]["alpha"] == 0.02  # + defaults
    assert printed["logging"]["backends"] == ["jsonl"] and printed["sft"]["cache_dir"] == f"{tmp_path}/.sft_cache"
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


def test_print_config_with_a_bad_key_is_the_usual_config_error():
    out = subprocess.run([sys.executable, "-m", "engine.coordinator", "--cfg", "train.num_stepz=7"],
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 2 and "unknown config key 'train.num_stepz'" in out.stderr and out.stdout == ""
