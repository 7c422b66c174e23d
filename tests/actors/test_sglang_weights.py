"""Weight updates on sglang servers from disk: every backend writes its own folder per version, once, in the
model's dtype, and removes the previous one after the server loaded the new one, so workers sharing one runs/
folder never collide (the README's one-worker-per-GPU recipe)."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from engine.backends.sglang import SGLangBackend, write_model_dir
from engine.modeling.model import load_model, save_weights
from tests.engine.test_adapters import build
from tests.sglang_standin import StandIn

pytestmark = pytest.mark.timeout(300)
VERSIONS = 50


def _version(model, v: int):
    with torch.no_grad():
        model.lm_head.weight.fill_(v / 100)
    return model


def test_two_workers_sharing_runs_update_weights_concurrently(tmp_path):
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "init")
    weights = tmp_path / "runs" / "demo" / "weights"
    for v in range(1, VERSIONS + 1):  # what the learner publishes
        save_weights(_version(model, v), weights / f"policy_v{v}.safetensors")
    standins = [StandIn(str(tmp_path / "init")) for _ in range(2)]
    backends = [SGLangBackend(str(tmp_path / "init"), url=s.url, eos_id=-1, worker_id=i)
                for i, s in enumerate(standins)]
    errors: list[BaseException] = []
    folders: list[set] = [set(), set()]

    def worker(i: int) -> None:
        try:
            for v in range(1, VERSIONS + 1):
                backends[i].load(str(weights / f"policy_v{v}.safetensors"))
                folders[i].add(backends[i].model_dir(str(weights / f"policy_v{v}.safetensors")).parent)
                assert standins[i].weight_version == str(v)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        [a], [b] = folders  # one folder of folders per worker, not shared
        assert a != b and a.parent == b.parent == weights / ".sglang"
        for folder in (a, b):  # only the version the server holds is left on disk
            assert sorted(p.name for p in folder.iterdir()) == [f"policy_v{VERSIONS}"]
        for s in standins:
            assert torch.equal(s.model.lm_head.weight, torch.full_like(s.model.lm_head.weight, VERSIONS / 100))
    finally:
        for backend in backends:
            backend.close()
        for s in standins:
            s.close()
    assert not any((weights / ".sglang").iterdir())  # closed backends leave nothing behind


def test_a_version_is_written_once_in_the_models_dtype(tmp_path):
    model = build("qwen3_moe")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "init")  # config.json: dtype bfloat16
    model.float()
    save_weights(model, tmp_path / "policy_v1.safetensors")  # the learner's fp32 file
    folder = write_model_dir(str(tmp_path / "policy_v1.safetensors"), str(tmp_path / "init"), str(tmp_path / "v1"))
    state = load_file(f"{folder}/model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in state  # checkpoint layout
    assert not any(k.endswith("gate_up_proj") for k in state)
    first = (tmp_path / "v1" / "model.safetensors").stat().st_mtime_ns
    assert write_model_dir(str(tmp_path / "policy_v1.safetensors"), str(tmp_path / "init"), folder) == folder
    assert (tmp_path / "v1" / "model.safetensors").stat().st_mtime_ns == first  # not written again
    reloaded = load_model(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], value.to(torch.bfloat16).float(), rtol=0, atol=0)
