"""Router Replay, measured: how far the trainer's recompute of the rollout's log-probs is with and without R3.

A tiny-but-not-trivial Qwen3-MoE (default: 4 layers, 32 experts, top-4, vocab 2048, random init) in bfloat16
generates groups with the rollout backend's KV-cache decode loop (engine/modeling/model.py::generate), recording every
router's top-k (engine/modeling/routing.py). The "trainer" then recomputes the same tokens' log-probs teacher-forced in
one full forward, as the learner's old-policy pass does: different kernels (full causal attention instead of
one-token decode against a cache), so bf16 numerics diverge and some routers flip. Replay off lets the trainer's
routers choose; R3 forces the recorded experts. A float32 control runs the same comparison.

Columns: gap = |log pi_train - log pi_rollout| per response token (mean, max), K3 = KL(rollout || train)
estimate, mismatch = fraction of response positions whose expert set differs in at least one layer (replay off),
"after flip" = the gap on tokens that follow a routing flip in their sequence (where replay can help) and
"no flip" = the rest (dense numerics only, which replay cannot change).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from configs.schema import ModelConfig


def _measure(model, prompts: list[list[int]], group_size: int, a: argparse.Namespace) -> dict:
    import torch

    from engine.modeling.model import generate, token_logprobs
    from engine.modeling.routing import mismatch_NT, pack_routes, route_hooks

    t0 = time.perf_counter()
    outs = generate(model, prompts, max_new_tokens=a.new_tokens, temperature=1.0, eos_id=-1, pad_id=0,
                    generator=torch.Generator().manual_seed(a.seed), capture_routes=True)
    gen_s = time.perf_counter() - t0
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    length = max(map(len, seqs))
    ids = torch.zeros((len(seqs), length), dtype=torch.long, device=a.device)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        attn[i, :len(s)] = 1
    routes, routed = pack_routes([(o.prompt_routes, o.routes) for o in outs], length)
    routes_t, routed_t = torch.from_numpy(routes.astype(np.int64)), torch.from_numpy(routed).long()
    rollout = torch.tensor([lp for o in outs for lp in o.logprobs], dtype=torch.float64)

    def response(logp_NL):
        return torch.cat([logp_NL[i, len(p):len(p) + len(o.token_ids)] for i, (p, o) in
                          enumerate(zip(prompts, outs))]).double().cpu()

    with torch.no_grad():
        with route_hooks(model) as own:
            off = response(token_logprobs(model, ids, attn))
        with route_hooks(model, forced_NTLK=routes_t, routed_N=routed_t, record=False):
            r3 = response(token_logprobs(model, ids, attn))
    flips_NL = mismatch_NT(own.stacked(0).reshape(routes_t.shape).cpu(), routes_t)
    flips_NL &= torch.arange(length)[None] < routed_t[:, None]
    positions, after_flip = [], []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        positions.append(flips_NL[i, len(p):len(p) + len(o.token_ids) - 1])
        seen = flips_NL[i].long().cumsum(0) > 0  # token t is predicted from positions < t
        after_flip.append(torch.cat([torch.zeros(1, dtype=torch.bool), seen[:-1]])[len(p):len(p) + len(o.token_ids)])
    flipped = torch.cat(after_flip)
    # wire cost: prompt routes once per group, response routes per token; vs int64 ids per sample (no sharing)
    wire = sum(o.routes.nbytes for o in outs) + sum(outs[g].prompt_routes.nbytes
                                                     for g in range(0, len(outs), group_size))
    naive = sum((len(o.prompt_routes) + len(o.routes)) * o.routes.shape[1] * o.routes.shape[2] * 8 for o in outs)
    tokens = sum(len(o.token_ids) for o in outs)
    out = {"gen_s": gen_s, "response_tokens": tokens, "routing_mismatch_frac_off": float(torch.cat(positions).float()
                                                                                         .mean()),
           "tokens_after_flip_frac": float(flipped.float().mean()), "route_bytes_per_token": wire / tokens,
           "route_bytes_per_token_int64_unshared": naive / tokens}
    for name, train in (("off", off), ("r3", r3)):
        d = train - rollout
        out[f"logprob_gap_{name}"] = float(d.abs().mean())
        out[f"logprob_gap_max_{name}"] = float(d.abs().max())
        out[f"k3_{name}"] = float((d.exp() - 1 - d).mean())
        out[f"logprob_gap_after_flip_{name}"] = float(d[flipped].abs().mean()) if flipped.any() else None
        out[f"logprob_gap_no_flip_{name}"] = float(d[~flipped].abs().mean()) if (~flipped).any() else None
    out["gap_ratio"] = out["logprob_gap_off"] / max(out["logprob_gap_r3"], 1e-12)
    return out


def main(argv: list[str]) -> dict:
    from bench.common import print_table

    p = argparse.ArgumentParser(prog="everyprompt-bench router-replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", help="rollout and trainer dtype (a float32 control also runs)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the MoE")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--experts", type=int, default=32, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=4, help="experts each token is routed to")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (random prompts)")
    p.add_argument("--init-std", type=float, default=0.02, help="N(0, std) init (HF default 0.02)")
    p.add_argument("--groups", type=int, default=16, help="distinct prompts")
    p.add_argument("--group-size", type=int, default=4, help="responses sampled per prompt")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per response")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device of both passes (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, the prompts and the sampling")
    a = p.parse_args(argv)
    import torch  # torch only after parsing: --help and argument errors answer at once

    from engine.modeling.model import build_model

    torch.set_num_threads(a.threads)
    cfg = ModelConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=2, head_dim=a.hidden // 4,
                      num_experts=a.experts, top_k=a.top_k, moe_intermediate_size=128, max_position_embeddings=512)
    base = build_model(cfg, a.vocab, seed=a.seed, init_std=a.init_std).eval()
    rng = torch.Generator().manual_seed(a.seed + 1)
    prompts = [torch.randint(3, a.vocab, (a.prompt_len,), generator=rng).tolist() for _ in range(a.groups)]
    prompts = [q for q in prompts for _ in range(a.group_size)]
    results, rows = {}, []
    for dtype in dict.fromkeys(["float32", a.dtype]):
        model = build_model(cfg, a.vocab, seed=a.seed, init_std=a.init_std).eval()
        model.load_state_dict(base.state_dict())
        model = model.to(device=a.device, dtype=getattr(torch, dtype))
        r = results[dtype] = _measure(model, prompts, a.group_size, a)
        for name in ("off", "r3"):
            rows.append([dtype, name, r[f"logprob_gap_{name}"], r[f"logprob_gap_max_{name}"], r[f"k3_{name}"],
                         r["routing_mismatch_frac_off"] if name == "off" else "-",
                         r[f"logprob_gap_after_flip_{name}"] or "-", r[f"logprob_gap_no_flip_{name}"] or "-"])
    print_table(["dtype", "replay", "gap mean", "gap max", "K3", "mismatch", "after flip", "no flip"], rows)
    main_r = results[a.dtype]
    print(f"gap ratio off/R3 ({a.dtype}): {main_r['gap_ratio']:.3g}; tokens after a flip: "
          f"{main_r['tokens_after_flip_frac']:.1%}; route bytes/token: {main_r['route_bytes_per_token']:.3g} "
          f"(int64 per sample, unshared: {main_r['route_bytes_per_token_int64_unshared']:.3g})")
    return {"config": vars(a), "logprob_gap_off": main_r["logprob_gap_off"], "logprob_gap_r3": main_r["logprob_gap_r3"],
            "gap_ratio": main_r["gap_ratio"], "routing_mismatch_frac_off": main_r["routing_mismatch_frac_off"],
            "route_bytes_per_token": main_r["route_bytes_per_token"], "by_dtype": results}
