import os

import pytest

from configs.schema import ModelConfig, RunConfig, SFTConfig, TaskConfig
from engine.modeling.model import load_model
from engine.modeling.sft import ensure_sft_checkpoint
from engine.data.tasks import build_task

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=4,
                   top_k=2, moe_intermediate_size=32)


@pytest.mark.timeout(60)
def test_sft_checkpoint_is_cached_on_second_call(tmp_path):
    cfg = RunConfig(model=TINY, task=TaskConfig(num_eval=8, num_dev=8),
                    sft=SFTConfig(max_steps=5, batch_size=8, eval_every=2, cache_dir=str(tmp_path), seed=0))
    task = build_task(cfg.task)
    logs = []
    with pytest.warns(UserWarning, match="below sft.target_accuracy"):
        path, stats = ensure_sft_checkpoint(cfg, task, progress=False, log=logs.append)
    assert stats["cached"] is False and stats["steps"] == 5 and stats["reached_target"] is False
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # the temp dir was renamed away
    model = load_model(path)
    assert model.config.vocab_size == task.tokenizer.vocab_size and model.config.num_hidden_layers == 1

    path2, stats2 = ensure_sft_checkpoint(cfg, task, progress=False, log=logs.append)
    assert path2 == path and stats2["cached"] is True and stats2["steps"] == 5

    cfg.sft.lr = 1e-3  # a different recipe is a different checkpoint
    with pytest.warns(UserWarning):
        path3, stats3 = ensure_sft_checkpoint(cfg, task, progress=False, log=logs.append)
    assert path3 != path and stats3["cached"] is False


@pytest.mark.timeout(60)
def test_sft_runs_only_when_wanted(tmp_path):
    import json

    from engine.modeling.sft import initial_policy

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}=", "answer": i}) + "\n" for i in range(20)))
    task_cfg = TaskConfig(name="jsonl", jsonl_path=str(data), num_eval=4, num_dev=2)
    off = RunConfig(model=TINY, task=task_cfg, sft=SFTConfig(enabled=False, cache_dir=str(tmp_path / "c")))
    path, stats = initial_policy(off, build_task(task_cfg), progress=False, log=lambda _: None)
    assert stats["skipped"] and stats["steps"] == 0 and load_model(path).config.num_hidden_layers == 1
    given = RunConfig(model=ModelConfig(init_from=path), task=task_cfg, sft=SFTConfig(cache_dir=str(tmp_path / "c")))
    assert initial_policy(given, build_task(task_cfg), progress=False, log=lambda _: None) == (path, stats)
