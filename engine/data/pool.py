"""``everyprompt-filter-pool``: the offline stage of zero-variance elimination (ALGORITHMS.md B.2.1).

A cheap policy (by default the run's cold-start SFT checkpoint, i.e. an earlier checkpoint of the policy; any HF
folder with ``--model``) answers every prompt of a pool ``-k`` times. Prompts it always solves (pass rate >=
``--max-pass-rate``) are dropped, and with ``--drop-unsolved`` those it never solves. The kept prompts are written
as jsonl with their pass rates; training reads them with ``task.train_pool=OUT`` and uses the pass rates to
pick group sizes (``rollout.adaptive_group_size``). Pass rates use the raw verifier outcome.

Resumable: every finished batch is appended to ``OUT.progress.jsonl``; a rerun with the same arguments skips the
prompts already there. The summary (also ``OUT.stats.json``) is the last stdout line.

Usage: everyprompt-filter-pool --out pool.jsonl [--pool in.jsonl | --pool-size 20000] [-k 8] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configs.load import load_cli
from engine.data.tasks import Example, Task, load_task, read_pool


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="everyprompt-filter-pool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the filtered pool (jsonl) to write")
    p.add_argument("--pool", default=None, help="input jsonl of prompt/answer lines (default: draw --pool-size "
                                                "prompts from the task's training distribution)")
    p.add_argument("--pool-size", type=int, default=20000, help="prompts to draw when --pool is not given")
    p.add_argument("--model", default=None, help="HF folder of the cheap policy (default: the cold-start SFT "
                                                 "checkpoint of this config, trained and cached if missing)")
    p.add_argument("-k", "--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-pass-rate", type=float, default=1.0, help="drop prompts solved at least this often")
    p.add_argument("--drop-unsolved", action="store_true", help="also drop prompts the cheap policy never solves")
    p.add_argument("--keep-all", action="store_true", help="drop nothing: only attach the pass rates")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the cheap policy")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per generation batch (and progress line)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--config-name", default="run", help="YAML preset in configs/ (e.g. run, tiny)")
    p.add_argument("--config-dir", default=None, help="folder holding your own YAML presets")
    p.add_argument("overrides", nargs="*", help="run config overrides (task.*, model.*, sft.*, seed)")
    return p.parse_args(argv)


def _pool(args: argparse.Namespace, task: Task, seed: int) -> list[tuple[Example, float | None]]:
    if args.pool:
        items = read_pool(args.pool)
    else:
        items = [(ex, None) for ex in task.sample_train(random.Random(seed + 7919), args.pool_size)]
    seen, out = set(), []
    for ex, rate in items:  # one line per distinct prompt
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append((ex, rate))
    return out


def pass_rates(model, task: Task, examples: list[Example], *, k: int, temperature: float, seed: int) -> list[float]:
    """Fraction of ``k`` sampled answers to each prompt that the verifier accepts (raw correctness)."""
    import torch

    from engine.modeling.model import generate

    prompts = [task.prompt_ids(ex) for ex in examples for _ in range(k)]
    outs = generate(model, prompts, max_new_tokens=task.max_answer_tokens, temperature=temperature,
                    eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id,
                    generator=torch.Generator().manual_seed(seed))
    correct = [task.score(task.tokenizer.decode(o.token_ids), ex.answer)[0]
               for ex, o in zip((ex for ex in examples for _ in range(k)), outs)]
    return np.asarray(correct, dtype=np.float64).reshape(len(examples), k).mean(1).tolist()


def select(rates: list[float], *, max_pass_rate: float, drop_unsolved: bool) -> list[bool]:
    """Keep a prompt unless the cheap policy solves it at least ``max_pass_rate`` of the time (or, with
    ``drop_unsolved``, never)."""
    return [not (r >= max_pass_rate or (drop_unsolved and r == 0.0)) for r in rates]


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    cfg = load_cli("everyprompt-filter-pool", args.overrides, config_name=args.config_name,
                   config_dir=args.config_dir)
    if cfg is None:
        return 2
    import torch  # torch and transformers only after parsing: --help and argument errors answer at once

    from engine.modeling.model import load_model

    torch.set_num_threads(args.threads)
    t0, task = time.monotonic(), load_task(cfg)
    pool = _pool(args, task, cfg.seed)
    out = Path(args.out)
    progress = out.with_name(out.name + ".progress.jsonl")
    done: dict[int, float] = {}
    if progress.exists():
        for line in progress.read_text().splitlines():
            try:
                row = json.loads(line)
                done[int(row["i"])] = float(row["pass_rate"])
            except (json.JSONDecodeError, KeyError, ValueError):
                continue  # a torn last line from an interrupted run
    todo = [i for i in range(len(pool)) if i not in done]
    model_dir = args.model
    if todo and model_dir is None:
        from engine.modeling.sft import initial_policy

        model_dir, _ = initial_policy(cfg, task, progress=True)
    model = load_model(model_dir).eval() if todo else None  # nothing left to estimate: no model needed
    with open(progress, "a") as f, tqdm(total=len(pool), initial=len(done), desc="filter-pool", unit="prompt") as bar:
        for b in range(0, len(todo), args.batch_prompts):
            idx = todo[b:b + args.batch_prompts]
            rates = pass_rates(model, task, [pool[i][0] for i in idx], k=args.samples,
                               temperature=args.temperature, seed=cfg.seed * 100_003 + idx[0])
            f.write("".join(json.dumps({"i": i, "pass_rate": r}) + "\n" for i, r in zip(idx, rates)))
            f.flush()
            os.fsync(f.fileno())
            done.update(zip(idx, rates))
            bar.update(len(idx))

    keep = select([done[i] for i in range(len(pool))], max_pass_rate=args.max_pass_rate,
                  drop_unsolved=args.drop_unsolved) if not args.keep_all else [True] * len(pool)
    kept = [{"prompt": ex.prompt, "answer": ex.answer, "source": ex.source, "difficulty": ex.difficulty,
             "pass_rate": done[i]} for i, (ex, _) in enumerate(pool) if keep[i]]
    dropped_solved = sum(done[i] >= args.max_pass_rate and not args.keep_all for i in range(len(pool)))
    dropped_unsolved = len(pool) - len(kept) - dropped_solved
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(out)
    rates = np.array([done[i] for i in range(len(pool))])
    g = cfg.rollout.group_size
    stats = {"pool": len(pool), "kept": len(kept), "dropped_solved": dropped_solved,
             "dropped_unsolved": dropped_unsolved, "samples_per_prompt": args.samples, "model": str(model_dir) if model_dir else None,
             "pass_rate_mean": float(rates.mean()) if len(rates) else 0.0,
             "pass_rate_hist": np.histogram(rates, bins=10, range=(0, 1))[0].tolist(),
             # expected share of groups of rollout.group_size whose raw correctness all agree, before / after
             "expected_zv_rate_before": float(np.mean(rates ** g + (1 - rates) ** g)) if len(rates) else 0.0,
             "expected_zv_rate_after": float(np.mean([r["pass_rate"] ** g + (1 - r["pass_rate"]) ** g
                                                      for r in kept])) if kept else 0.0,
             "out": str(out), "seconds": time.monotonic() - t0}
    out.with_name(out.name + ".stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
