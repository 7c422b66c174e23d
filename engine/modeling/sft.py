"""Cold-start SFT: teach the random-init model the answer format, stop at a dev-accuracy target, cache.

Stopping on greedy dev accuracy (not on a step count) is what makes the RL stage's headroom predictable:
accuracy on arithmetic jumps sharply partway through training, at a step that varies with seed and CPU.
The checkpoint is an HF ``save_pretrained`` folder under ``sft.cache_dir``, keyed by a hash of everything
that determines it, so later runs with the same model/task/SFT config skip training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from configs.schema import RunConfig
from engine.modeling.model import build_model, evaluate_greedy, load_model, save_model
from engine.data.tasks import Task

_STATS_FILE = "sft_stats.json"
_NOT_IN_KEY = {"enabled", "cache_dir", "max_time_s"}  # these do not change what a finished run would produce


def cache_key(cfg: RunConfig, task: Task) -> str:
    sft = {k: v for k, v in dataclasses.asdict(cfg.sft).items() if k not in _NOT_IN_KEY}
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("init_from", "dtype")}
    task_cfg = {k: v for k, v in dataclasses.asdict(cfg.task).items() if k != "train_pool"}  # RL prompts only
    key = {"model": model, "task": task_cfg, "sft": sft, "vocab": task.tokenizer.fingerprint, "version": 1}
    if cfg.model.init_from is not None:  # SFT of a given checkpoint (the built-in model's keys stay as they were)
        key["init_from"] = str(Path(cfg.model.init_from).resolve())
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _batch(task: Task, examples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask), each [B, L]."""
    rows = [task.sft_ids(ex) for ex in examples]
    L = max(len(ids) for ids, _ in rows)
    ids_BL = torch.full((len(rows), L), task.tokenizer.pad_id, dtype=torch.long)
    attn_BL = torch.zeros((len(rows), L), dtype=torch.long)
    loss_BL = torch.zeros((len(rows), L), dtype=torch.float32)
    for i, (ids, mask) in enumerate(rows):
        ids_BL[i, :len(ids)] = torch.tensor(ids)
        attn_BL[i, :len(ids)] = 1
        loss_BL[i, :len(ids)] = torch.tensor(mask, dtype=torch.float32)
    return ids_BL, attn_BL, loss_BL


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)  # stdout is reserved for the run's summary line


def train_sft(cfg: RunConfig, task: Task, *, progress: bool = True, log: Callable[[str], None] = _stderr):
    """Train from random init (or ``model.init_from``) until dev accuracy >= target (or a step/time limit) -> (model, stats)."""
    s = cfg.sft
    tok = task.tokenizer
    if cfg.model.init_from is not None:  # sft.enabled=true with a checkpoint: fine-tune it (fp32)
        model = load_model(cfg.model.init_from)
    else:
        model = build_model(cfg.model, tok.vocab_size, seed=s.seed, pad_id=tok.pad_id, bos_id=tok.bos_id,
                            eos_id=tok.eos_id)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = random.Random(s.seed)
    t0, step, dev_acc, history = time.monotonic(), 0, 0.0, []
    bar = tqdm(total=s.max_steps, desc="sft", disable=not progress, dynamic_ncols=True)
    while step < s.max_steps and time.monotonic() - t0 < s.max_time_s:
        ids_BL, attn_BL, loss_BL = _batch(task, task.sample_train(rng, s.batch_size))
        logits_BLV = model(input_ids=ids_BL, attention_mask=attn_BL, use_cache=False).logits[:, :-1]
        nll_BL = F.cross_entropy(logits_BLV.transpose(1, 2), ids_BL[:, 1:], reduction="none")
        loss = (nll_BL * loss_BL[:, 1:]).sum() / loss_BL[:, 1:].sum()
        for group in opt.param_groups:  # linear warmup, then constant
            group["lr"] = s.lr * min(1.0, (step + 1) / max(1, s.warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % s.eval_every == 0:
            dev_acc = evaluate_greedy(model, task, task.dev_set)
            history.append((step, round(time.monotonic() - t0, 2), dev_acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", dev_acc=f"{dev_acc:.3f}")
            if dev_acc >= s.target_accuracy:
                break
    bar.close()
    seconds = time.monotonic() - t0
    reached = dev_acc >= s.target_accuracy
    if not reached:
        warnings.warn(f"SFT stopped at step {step} after {seconds:.0f} s with dev accuracy {dev_acc:.3f}, "
                      f"below sft.target_accuracy={s.target_accuracy}; raise sft.max_steps / sft.max_time_s "
                      "or lower the target", stacklevel=2)
    stats = {"steps": step, "seconds": round(seconds, 2), "dev_accuracy": dev_acc, "reached_target": reached,
             "target_accuracy": s.target_accuracy, "history": history}
    log(f"sft done: {step} steps, {seconds:.1f} s, dev accuracy {dev_acc:.3f}")
    return model, stats


def ensure_sft_checkpoint(cfg: RunConfig, task: Task, *, progress: bool = True,
                          log: Callable[[str], None] = _stderr) -> tuple[str, dict]:
    """Path of an HF save_pretrained folder holding the SFT model, plus stats
    (steps, seconds, dev_accuracy, reached_target, cached). Trains only on a cache miss."""
    final = Path(cfg.sft.cache_dir) / f"sft-{cache_key(cfg, task)}"
    if (final / _STATS_FILE).exists():
        stats = json.loads((final / _STATS_FILE).read_text())
        log(f"sft cache hit: {final}")
        return str(final), {**stats, "cached": True}
    final.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the actors are not running yet: take every core
    try:
        torch.manual_seed(cfg.sft.seed)
        model, stats = train_sft(cfg, task, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)

    def write(tmp: Path) -> None:
        save_model(model, tmp)
        if cfg.model.init_from is not None:
            task.tokenizer.save(tmp)  # a complete HF folder (the sglang backend serves it as it is)
        (tmp / _STATS_FILE).write_text(json.dumps(stats, indent=1))

    _publish(final, write)
    return str(final), {**stats, "cached": False}


def sft_wanted(cfg: RunConfig) -> bool:
    """sft.enabled, where unset (None) means: on for the built-in model, off for ``model.init_from``."""
    return cfg.sft.enabled if cfg.sft.enabled is not None else cfg.model.init_from is None


def initial_policy(cfg: RunConfig, task: Task, *, progress: bool = True,
                   log: Callable[[str], None] = _stderr) -> tuple[str, dict]:
    """The HF folder RL starts from, plus SFT stats: ``model.init_from`` as it is, the (cached) SFT checkpoint,
    or, with sft.enabled=false and no init_from, the random-init model."""
    if sft_wanted(cfg):
        return ensure_sft_checkpoint(cfg, task, progress=progress, log=log)
    skipped = {"steps": 0, "seconds": 0.0, "cached": False, "skipped": True}
    if cfg.model.init_from is not None:
        log(f"sft skipped: starting from {cfg.model.init_from}")
        return cfg.model.init_from, skipped
    final = Path(cfg.sft.cache_dir) / f"init-{cache_key(cfg, task)}"
    if not (final / "config.json").exists():
        tok = task.tokenizer
        model = build_model(cfg.model, tok.vocab_size, seed=cfg.sft.seed, pad_id=tok.pad_id, bos_id=tok.bos_id,
                            eos_id=tok.eos_id)
        _publish(final, lambda tmp: save_model(model, tmp))
    log(f"sft disabled: starting from the random-init model {final}")
    return str(final), skipped


def _publish(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder beside ``final`` with ``write`` and rename it into place (a reader sees none or all of it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():  # not a lost race with another writer
            raise
