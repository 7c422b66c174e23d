"""Generation throughput of the transformers backend (the embedded tiny Qwen3-MoE) by batch and threads."""

from __future__ import annotations

import argparse
import time


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="everyprompt-bench generate", description=__doc__)
    p.add_argument("--batches", default="16,128,512", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,2", help="comma-separated torch CPU thread counts")
    p.add_argument("--prompt-len", type=int, default=12, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sequence")
    a = p.parse_args(argv)
    import torch  # after parsing: --help answers without loading torch

    from bench.common import print_table
    from configs.schema import ModelConfig
    from engine.data.tasks import CharTokenizer
    from engine.modeling.model import build_model, generate

    tok = CharTokenizer()
    model = build_model(ModelConfig(), tok.vocab_size, seed=0).eval()
    rows, out = [], []
    for threads in map(int, a.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, a.batches.split(",")):
            prompts = [[(i * 7 + j) % 10 + 3 for j in range(a.prompt_len)] for i in range(batch)]
            for routes in (False, True):  # side by side: the cost of recording MoE routes (router replay)
                run = lambda: generate(model, prompts, max_new_tokens=a.new_tokens, temperature=1.0,  # noqa: E731
                                       eos_id=-1, pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0),
                                       capture_routes=routes)
                run()  # warm-up
                t0 = time.perf_counter()
                outs = run()
                dt = time.perf_counter() - t0
                new_tokens = sum(len(g.token_ids) for g in outs)
                rows.append([threads, batch, routes, new_tokens, dt, new_tokens / dt])
                out.append({"threads": threads, "batch": batch, "capture_routes": routes, "new_tokens": new_tokens,
                            "seconds": dt, "tokens_per_s": new_tokens / dt})
    print_table(["threads", "batch", "routes", "new_tokens", "seconds", "tokens/s"], rows)
    return {"config": vars(a), "metrics": out}
