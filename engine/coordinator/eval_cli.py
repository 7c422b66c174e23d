"""``everyprompt-eval``: score a saved policy on a task's prompts: greedy accuracy and pass@k.

Usage: everyprompt-eval MODEL [--split eval|dev|train] [--limit N] [--k K] [--samples N] [--temperature T]
                        [--config-name NAME] [--config-dir DIR] [key=value ...]

MODEL is one of:
  - a run's folder (runs/<name>/): its exported policy (policy/) on the run's own task, tokenizer and verifier
    (runs/<name>/config.yaml); key=value overrides change them (e.g. task.num_eval=100);
  - one of its checkpoints (runs/<name>/checkpoints/step_N/, or runs/<name>/checkpoints/ for the newest): the
    weights the rollout workers held at that step;
  - any HF causal-LM folder (config.json + weights, its own tokenizer or none for the built-in character one): the
    task comes from --config-name and the key=value overrides, the same task.* / reward.* keys as
    everyprompt-train.
Responses are decoded by engine/modeling/decode.py (what rollout.backend=hf workers run) up to
task.max_answer_tokens, verified by the task's verifier (reward.plugin) in the plugin pool and recorded as the
reward worker does (actors/reward_worker.py), and scored by engine/evaluation.py, like the run's periodic eval.
Prints a table, then, as the last stdout line, a JSON object: accuracy, pass_at_k, num_prompts, model, task, ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from configs.load import ConfigError, load
from configs.schema import RunConfig

PROG = "everyprompt-eval"
SPLITS = ("eval", "dev", "train")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line naming the option, exit 2 (argparse's own prints the usage too)
        print(f"{PROG}: {message} (see {PROG} --help)", file=sys.stderr)
        sys.exit(2)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run's folder, one of its checkpoints, or an HF causal-LM folder")
    p.add_argument("--split", choices=SPLITS, default="eval",
                   help="which prompts: the held-out eval set (default), the dev set, or training prompts")
    p.add_argument("--limit", type=int, default=None, help="score at most this many prompts of the split")
    p.add_argument("--k", type=int, default=4, help="pass@k's k (0 = greedy accuracy only); default 4")
    p.add_argument("--samples", type=int, default=None,
                   help="sampled responses per prompt for pass@k (at least k; default k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for pass@k (default: the config's rollout.temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled responses (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="responses decoded together (default: the config's rollout.max_batch_samples)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads for decoding (default: every core this process may use)")
    p.add_argument("--config-name", default="run",
                   help="for an HF folder: the YAML preset the task and verifier come from (e.g. run, tiny)")
    p.add_argument("--config-dir", default=None, help="for an HF folder: a folder holding your own YAML presets")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. task.name=jsonl "
                                                "task.jsonl_path=data.jsonl reward.plugin=math")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    for name, low in (("limit", 1), ("k", 0), ("samples", 1), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')}={value} is invalid: it must be >= {low}")
    if args.samples is not None and args.samples < args.k:
        p.error(f"--samples={args.samples} is invalid: pass@{args.k} needs at least --k={args.k} samples per prompt")
    if args.temperature is not None and args.temperature <= 0 and args.k:
        p.error(f"--temperature={args.temperature} is invalid: sampling for pass@k needs a temperature > 0")
    return args


# ---- what MODEL names ------------------------------------------------------------------------------------------

@dataclass
class Source:
    model_dir: Path  # the HF folder whose architecture (and, without ``weights``, weights) is loaded
    weights: Path | None  # a checkpoint's policy.safetensors, loaded over it
    cfg: RunConfig
    tokenizer: object
    label: str  # how the table and the JSON name the model


def _run_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """A run's config.yaml with ``overrides``, typed and checked like everyprompt-train's (the run schema first)."""
    with tempfile.TemporaryDirectory(prefix="everyprompt-eval-") as d:
        text = (run_dir / "config.yaml").read_text()
        Path(d, "run.yaml").write_text("defaults:\n  - run_schema\n  - _self_\n" + text)
        return load(overrides, config_name="run", config_dir=d)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def _tokenizer(folder: Path, cfg: RunConfig | None):
    """The run's tokenizer (``cfg``: the built-in one unless model.init_from), else the folder's own, else the
    built-in character tokenizer."""
    from engine.data.tokenizer import CharTokenizer, HFTokenizer

    if (cfg is not None and cfg.model.init_from is None) or not _has_tokenizer(folder):
        return CharTokenizer()
    return HFTokenizer(str(folder))


def _checkpoint(path: Path):
    """The checkpoint at ``path`` (step_N/, or checkpoints/ for the newest), its manifest checked."""
    from engine.coordinator import checkpoint

    if (path / "meta.json").exists():
        try:
            meta = checkpoint.verify(path)
        except checkpoint.CheckpointCorrupt as e:
            raise ConfigError(f"checkpoint {path}: {e}; pick another one under {path.parent}") from None
        return checkpoint.Checkpoint(path=path, step=int(meta["step"]), meta=meta), path.parent.parent
    ckpt = checkpoint.latest(path.parent)
    if ckpt is None:
        raise ConfigError(f"{path} holds no complete checkpoint (train.checkpoint_every saves them); "
                          f"pass the run's folder {path.parent} to score its exported policy")
    return ckpt, path.parent


def locate(path: Path, overrides: list[str], *, config_name: str, config_dir: str | None) -> Source:
    """What ``path`` names: a run's folder, a checkpoint, or an HF model folder; ConfigError naming the fix."""
    if not path.is_dir():
        raise ConfigError(f"MODEL {path}: no such folder; pass a run's folder (runs/<name>/), a checkpoint "
                          f"(runs/<name>/checkpoints/step_N/) or an HF model folder (with config.json)")
    weights = None
    if (path / "policy.safetensors").exists() or path.name == "checkpoints":
        ckpt, run_dir = _checkpoint(path)
        weights = ckpt.policy_path
    else:
        run_dir = path
    if (run_dir / "config.yaml").exists():
        cfg = _run_config(run_dir, overrides)
        model_dir = run_dir / "policy"
        if weights is None and not (model_dir / "config.json").exists():
            raise ConfigError(f"run {run_dir} has no exported policy ({model_dir}: the run did not finish); "
                              f"pass one of its checkpoints, e.g. {run_dir / 'checkpoints'}")
        return Source(model_dir, weights, cfg, _tokenizer(model_dir, cfg), str(path))
    if (path / "config.json").exists():
        cfg = load(overrides, config_name=config_name, config_dir=config_dir)
        return Source(path, None, cfg, _tokenizer(path, None), str(path))
    raise ConfigError(f"MODEL {path} is neither a run's folder (config.yaml), a checkpoint (meta.json + "
                      f"policy.safetensors) nor an HF model folder (config.json); pass one of those")


def load_policy(src: Source):
    """The policy as a torch model in eval mode: the HF folder, a checkpoint's weights loaded over it. A checkpoint
    of a run without policy/ gets its architecture from model.init_from or the built-in model config."""
    from engine.modeling.model import build_model, load_model, load_weights

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for the log; stdout for the table and the JSON line
    cfg, tok = src.cfg, src.tokenizer
    if (src.model_dir / "config.json").exists():
        model = load_model(src.model_dir, cfg.model.dtype)
    elif cfg.model.init_from is not None:
        model = load_model(cfg.model.init_from, cfg.model.dtype)
    else:
        model = build_model(cfg.model, tok.vocab_size, seed=0, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    if src.weights is not None:
        load_weights(model, src.weights)
    return model.eval()


# ---- prompts, decoding, scoring --------------------------------------------------------------------------------

def split_examples(task, split: str, limit: int | None, seed: int) -> list:
    """The split's examples (Example), at most ``limit``; ``train``: the first training prompts of the run's seeded
    stream (as many as the eval set unless ``limit``)."""
    if split == "train":
        n = limit or len(task.eval_set)
        return [ex for _, ex, _ in islice(task.train_stream(seed), n)]
    examples = task.eval_set if split == "eval" else task.dev_set
    if not examples:
        raise ConfigError(f"--split {split}: the task's {split} set is empty; set task.num_{split} or pick "
                          f"another split")
    return examples[:limit] if limit else list(examples)


def decode(model, task, examples: list, *, per_prompt: int, temperature: float, batch_size: int,
           generator=None) -> list[list[list[int]]]:
    """``per_prompt`` responses (token ids) per example, decoded by DecodeBatch as the hf rollout workers do."""
    from engine.modeling.decode import DecodeBatch, Row

    tok = task.tokenizer
    rows = [Row(key=(i, j), prompt=task.prompt_ids(ex), max_new_tokens=task.max_answer_tokens,
                temperature=temperature) for i, ex in enumerate(examples) for j in range(per_prompt)]
    for lo in range(0, len(rows), batch_size):
        batch = DecodeBatch(model, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator)
        batch.add(rows[lo:lo + batch_size])
        while batch.active:
            batch.step(0)
    out: list[list[list[int]]] = [[] for _ in examples]
    for r in rows:
        out[r.key[0]].append(list(r.tokens))
    return out


async def score(cfg: RunConfig, task, examples: list, responses: list[list[list[int]]]
                ) -> tuple[list[list[float]], int]:
    """(correctness of every response, how many the verifier could not judge): the run's verifier in the plugin
    pool, each verdict recorded by the reward worker's ``to_scored``."""
    import numpy as np

    from actors.reward_worker import to_scored, verifier_name
    from engine.evaluation import correctness
    from engine.rewards.plugins import PluginPool
    from transport import ScoreRequest

    r = cfg.reward
    pool = PluginPool(verifier_name(r), {"sandbox": r.sandbox}, num_procs=r.plugin_processes,
                      timeout_s=r.plugin_timeout_s)

    async def one(key: str, ids: list[int], answer: str):
        text = task.tokenizer.decode(ids)
        msg = ScoreRequest(sample_key=key, token_ids=np.asarray(ids, dtype=np.int32), answer=answer)
        return to_scored(task, msg, text, await pool.score(text, answer), r)

    try:
        scored = await asyncio.gather(*(asyncio.gather(*(one(f"{i}/{j}", ids, ex.answer)
                                                          for j, ids in enumerate(resp)))
                                        for i, (ex, resp) in enumerate(zip(examples, responses))))
    finally:
        pool.close()
    invalid = sum(not s.valid for group in scored for s in group)
    return [[correctness(s.reward, s.reward_parts) for s in group] for group in scored], invalid


def evaluate(src: Source, args: argparse.Namespace) -> dict:
    """Greedy accuracy and pass@k of ``src`` as ``args`` say; the summary the command prints."""
    import torch

    from engine.data.tasks import build_task
    from engine.evaluation import score_eval

    t0, cfg = time.monotonic(), src.cfg
    task = build_task(cfg.task, src.tokenizer)
    examples = split_examples(task, args.split, args.limit, cfg.seed)
    model = load_policy(src)
    batch = args.batch_size or cfg.rollout.max_batch_samples
    temperature = cfg.rollout.temperature if args.temperature is None else args.temperature
    n = (args.samples or args.k) if args.k else 0
    responses = decode(model, task, examples, per_prompt=1, temperature=0.0, batch_size=batch)
    if n:
        gen = torch.Generator().manual_seed(args.seed)
        sampled = decode(model, task, examples, per_prompt=n, temperature=temperature, batch_size=batch,
                         generator=gen)
        responses = [g + s for g, s in zip(responses, sampled)]
    correct, invalid = asyncio.run(score(cfg, task, examples, responses))
    scores = score_eval([c[0] for c in correct], [c[1:] for c in correct], k=args.k if n else 0)
    return {"model": src.label, "model_dir": str(src.model_dir), "weights": src.weights and str(src.weights),
            "task": cfg.task.name if cfg.task.name != "jsonl" else f"jsonl:{cfg.task.jsonl_path}",
            "split": args.split, "verifier": cfg.reward.plugin, "accuracy": scores["accuracy"],
            "pass_at_k": scores.get("pass_at_k"), "k": args.k if n else 0, "num_samples": n,
            "temperature": temperature if n else None, "num_prompts": scores["num_prompts"],
            "invalid_responses": invalid, "eval_s": round(time.monotonic() - t0, 3)}


def table(result: dict) -> str:
    """The human-readable summary."""
    rows = [("model", result["model"] + (f" (weights {result['weights']})" if result["weights"] else "")),
            ("task", f"{result['task']}, {result['split']} split, {result['num_prompts']} prompts, "
                     f"verifier {result['verifier']}"),
            ("accuracy", f"{result['accuracy']:.4f}  (greedy, one response per prompt)")]
    if result["k"]:
        rows.append((f"pass@{result['k']}", f"{result['pass_at_k']:.4f}  ({result['num_samples']} samples per "
                                            f"prompt at temperature {result['temperature']:g})"))
    rows += [("invalid", f"{result['invalid_responses']}  (responses the verifier could not judge)"),
             ("time", f"{result['eval_s']:.1f} s")]
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from engine.log import configure_logging

    configure_logging(role="eval")
    try:
        src = locate(Path(args.model), args.overrides, config_name=args.config_name, config_dir=args.config_dir)
        import torch

        torch.set_num_threads(args.threads)
        result = evaluate(src, args)
    except (ConfigError, ValueError) as e:  # a DataError or a bad task.* value names its key already
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(table(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
