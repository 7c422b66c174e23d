"""Elastic resize keeps Adam's moments: a learner checkpoint saved by 2 ranks resumes on 1 rank, and one saved by 1
rank resumes on 2, with every parameter's exp_avg, exp_avg_sq and fp32 master weight (gathered over the ranks)
exactly as they were saved. Real DeepSpeed on gloo in real torchrun process groups: this file is also the ranks'
script (``python -m torch.distributed.run ... tests/actors/test_learner_resize.py PHASE ...``), which builds the
real ``LearnerRank``, trains, saves and resumes as the elastic learner does (actors/learner_state.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LAUNCH_S = 300.0  # torchrun, imports and DeepSpeed init (and the Universal conversion) on a busy 2-core box


def gathered_state(learner) -> dict[str, dict[str, torch.Tensor]]:
    """Every rank (collective under ZeRO): each parameter's full fp32 master weight and Adam moments."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out, opt = {}, learner.engine.optimizer
    # bf16 on ZeRO stage 0: DeepSpeed's unpartitioned FP16_UnfusedOptimizer, an fp32 master per parameter
    masters = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
               for lp, hp in zip(lps, hps)}
    for name, p in learner.engine.module.named_parameters():
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2 or bf16: partitioned over the ranks
            out[name] = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                         "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        else:  # ZeRO stage 0: torch's AdamW holds the fp32 parameter (or its master), whole on every rank
            hp = masters.get(id(p), p)
            state = (opt.optimizer if hp is not p else opt).state[hp]
            out[name] = {"fp32": hp.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
    return {n: {k: v.detach().float().cpu().clone() for k, v in d.items()} for n, d in out.items()}


def _rank_main(argv: list[str]) -> None:
    """One torchrun rank: optionally resume, dump the gathered state, train ``--steps`` batches, save, dump."""
    import torch.distributed as dist

    from actors.learner import LearnerRank
    from configs.load import load_resolved
    from test_learner import _batch  # this file's folder is the script's sys.path[0]

    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--dump", required=True)
    args = p.parse_args(argv)
    learner = LearnerRank(load_resolved(args.config), args.init, str(Path(args.dump).parent / "weights"),
                          resume=args.resume)
    dump = {"world": learner.world, "tag": learner.resume_tag, "version": learner.version,
            "loaded": gathered_state(learner) if args.resume else None}  # Adam has no state before a step
    for i in range(args.steps):
        learner.step(_batch(learner.version + 1, seed=learner.version + 1))
    assert learner.save(args.save) == ""
    dump["saved"] = gathered_state(learner)
    if learner.rank == 0:
        torch.save(dump, args.dump)
    dist.barrier()


def _launch(tmp_path: Path, world: int, name: str, *, steps: int, resume: Path | None = None) -> dict:
    """torchrun with ``world`` gloo ranks on this machine -> rank 0's dump."""
    dump, log = tmp_path / f"{name}.pt", tmp_path / f"{name}.log"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            __file__, "--config", str(tmp_path / "config.yaml"), "--init", str(tmp_path / "init"),
            "--steps", str(steps), "--save", str(tmp_path / f"ckpt_{name}"), "--dump", str(dump)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/tex")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(LAUNCH_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # our torchrun's own session, by handle
            proc.wait()
            code = "timeout"
    tail = log.read_text(errors="replace")[-4000:]
    assert code == 0, f"torchrun ({world} ranks, {name}) exited {code}; log tail:\n{tail}"
    return {**torch.load(dump, weights_only=False), "log": log.read_text(errors="replace")}


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        for key in ("exp_avg", "exp_avg_sq", "fp32"):
            assert torch.equal(before[name][key], after[name][key]), (name, key)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision, zero_stage", [("fp32", 1), ("bf16", 1), ("fp32", 0), ("bf16", 0)])
def test_a_resize_from_2_to_1_to_2_ranks_keeps_adam_moments(tmp_path, precision, zero_stage):
    from configs.load import save
    from configs.schema import ModelConfig, RunConfig
    from engine.modeling.model import build_model, save_model
    from test_learner import VOCAB

    cfg = RunConfig()
    cfg.model = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                            num_experts=4, top_k=2, moe_intermediate_size=32)
    cfg.learner.lr, cfg.learner.precision, cfg.learner.zero_stage = 1e-2, precision, zero_stage
    cfg.learner.gap_probe_seqs = 0
    save(cfg, tmp_path / "config.yaml")
    save_model(build_model(cfg.model, VOCAB, seed=0), tmp_path / "init")

    two = _launch(tmp_path, 2, "two", steps=2)
    moved = [n for n, d in two["saved"].items() if d["exp_avg"].abs().sum() > 0]
    assert len(moved) > len(two["saved"]) // 2, "Adam has no moments to keep: the test would prove nothing"

    one = _launch(tmp_path, 1, "one", steps=1, resume=tmp_path / "ckpt_two")
    assert one["version"] == 2 and one["world"] == 1
    _assert_same_state(two["saved"], one["loaded"])
    assert one["tag"] == ("state" if zero_stage == 0 else "state_universal")  # stage 0: nothing partitioned
    assert "learner.optimizer_reset" not in one["log"]

    again = _launch(tmp_path, 2, "again", steps=1, resume=tmp_path / "ckpt_one")
    assert again["version"] == 3 and again["tag"] == one["tag"]
    _assert_same_state(one["saved"], again["loaded"])
    assert any(not torch.equal(again["saved"][n]["exp_avg"], again["loaded"][n]["exp_avg"]) for n in moved)


if __name__ == "__main__":
    _rank_main(sys.argv[1:])
