"""Wall time of one learner optimizer step (``LearnerRank.step``) on a fixed batch, one rank, in this process.

    python -m bench.learner_step_bench --seqs 128 --steps 10 [--impl DIR] [--threads 2] [--device cuda] [key=value ...]

The default model (configs/schema.py ModelConfig) and character vocabulary; ``--seqs`` sequences of a prompt of
``--prompt`` tokens and responses up to ``--resp`` tokens, behaviour log-probs and R3 routes recorded by the
version-0 model, every token one version behind after the first step (the steady state of a one-step-off run).
``--impl DIR`` puts DIR first on sys.path, so a saved copy of ``actors/`` (e.g. the code before a change) runs on
the same batch and machine. ``--device cuda`` runs the rank on the GPU (``learner.dist_backend=auto`` resolves to
NCCL; ``model.dtype=bfloat16`` makes ``learner.precision=auto`` DeepSpeed bf16). Prints one JSON line: per-step seconds, their median and mean (the mean includes the
steps that run the gap probe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, default=128)
    p.add_argument("--prompt", type=int, default=12)
    p.add_argument("--resp", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one NCCL rank on GPU 0")
    p.add_argument("--impl", default=None, help="a folder holding an actors/ package to run instead of this one")
    p.add_argument("overrides", nargs="*", help="learner.* config overrides, e.g. learner.num_minibatches=2")
    a = p.parse_args(argv)
    if a.impl:
        sys.path.insert(0, a.impl)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29611"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    if a.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from actors.learner import LearnerRank
    from actors.learner_parts import resolve_backend
    from configs.schema import RunConfig
    from engine.data.tokenizer import CharTokenizer
    from engine.modeling.model import build_model, save_model, token_logprobs
    from engine.modeling.routing import route_hooks
    from transport.messages import TrainBatch

    cfg = RunConfig()
    if a.device == "cpu":
        cfg.learner.dist_backend = "gloo"
    for item in a.overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        target = getattr(cfg, section)
        setattr(target, name, type(getattr(target, name))(value) if not isinstance(getattr(target, name), bool)
                else value.lower() == "true")
    vocab = CharTokenizer().vocab_size
    model = build_model(cfg.model, vocab, seed=0)
    rng = np.random.default_rng(0)
    n, length = a.seqs, a.prompt + a.resp
    resp = rng.integers(a.resp // 2, a.resp + 1, size=n).astype(np.int32)
    ids = rng.integers(3, vocab, size=(n, length)).astype(np.int32)
    in_resp = (np.arange(length) >= a.prompt) & (np.arange(length) < a.prompt + resp[:, None])
    ids[np.arange(length) >= a.prompt + resp[:, None]] = 0
    ids_t = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad(), route_hooks(model) as own:
        logp = token_logprobs(model, ids_t, (ids_t != 0).long())
    routes = own.stacked(0).reshape(n, length, *own.stacked(0).shape[1:]).numpy().astype(np.uint8)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/init")
        learner = LearnerRank(cfg, f"{tmp}/init", f"{tmp}/weights")
        times = []
        for step in range(1, a.steps + 2):  # the first step warms up and is not counted
            batch = TrainBatch(step=step, input_ids=ids, prompt_lens=np.full(n, a.prompt, np.int32),
                               response_lens=resp, behavior_logprobs=np.where(in_resp, logp.numpy(), 0.0)
                               .astype(np.float32),
                               token_versions=np.where(in_resp, max(step - 2, 0), -1).astype(np.int32),
                               advantages=rng.standard_normal(n).astype(np.float32), routes=routes,
                               routed_lens=(a.prompt + resp - 1).astype(np.int32))
            sync()
            t0 = time.perf_counter()
            learner.step(batch)
            sync()
            times.append(time.perf_counter() - t0)
        precision = learner.precision
    steps = times[1:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else None
    print(json.dumps({"impl": a.impl or "current", "device": a.device,
                      "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
                      "dist_backend": resolve_backend(cfg.learner), "precision": precision,
                      "seqs": n, "threads": a.threads, "overrides": a.overrides,
                      "trained_tokens_per_s": round(float(resp.sum()) / statistics.median(steps), 1),
                      "peak_gpu_gib": round(peak, 2) if peak is not None else None,
                      "median_s": round(statistics.median(steps), 4), "mean_s": round(statistics.mean(steps), 4),
                      "steps_s": [round(t, 4) for t in steps]}))


if __name__ == "__main__":
    main()
