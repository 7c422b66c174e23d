"""Everything a run depends on, checked before anything starts (and before runs/<name>/ is touched).

``check`` raises ``ConfigError`` (one line: what is wrong and how to fix it) for: the dataset (exists, decodes,
parses, has the fields, leaves training prompts), the model folder (exists, config.json parses, an architecture
AutoModelForCausalLM builds, its tokenizer loads and fits the model's vocabulary), the reward plugin (imported),
the transport port (bound and released), the metrics backends (installed), the output folder (writable, and
on a disk with room for a checkpoint: ``_free_space``), an existing run's state (a fresh run does not silently
replace checkpoints), and on ``resume=true`` the saved config (model shape and task unchanged).
Warnings (split sizes scaled, answers longer than the generation limit) are logged once, here.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import tempfile
import warnings
from pathlib import Path

import structlog

from configs.load import ConfigError, load_resolved
from configs.schema import RunConfig
from engine.coordinator.metric_sinks import EXTRAS, MODULES, installed, resolve_backends

log = structlog.get_logger()


def prepare(cfg: RunConfig) -> RunConfig:
    """``check`` every input, then the config the run uses: router replay for its model, the generation limit for
    its data (both saved in config.yaml, so every actor uses the same)."""
    task = check(cfg)
    cfg = resolve_answer_limit(resolve_router_replay(cfg), task.max_answer_tokens)
    cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, backends=resolve_backends(cfg.logging)))
    if cfg.resume:  # compared once resolved: an unset (derived) limit is the number the run derived
        _same_as_saved(cfg, Path(cfg.out_dir) / cfg.name / "config.yaml")
    return cfg


def check(cfg: RunConfig):
    """Raise ConfigError for the first problem found; nothing is written except a probe file (removed). Returns
    the task it loaded (engine/data/tasks.py ``Task``)."""
    run_dir = Path(cfg.out_dir) / cfg.name
    _run_state(cfg, run_dir)
    _writable(run_dir)
    if cfg.model.init_from is not None:
        _model_folder(cfg.model.init_from)
    task = _task(cfg)
    _free_space(run_dir, _weights_bytes(cfg, task))
    _plugin(cfg)
    _port(cfg.transport.host, cfg.transport.port)
    _metrics_backends(cfg)
    return task


def _metrics_backends(cfg: RunConfig) -> None:
    """Every live backend ``logging.backends`` names explicitly is installed (unset: tensorboard only if it is)."""
    for backend in cfg.logging.backends or ():
        if backend in MODULES and not installed(backend):
            raise ConfigError(f"logging.backends includes {backend} but the {MODULES[backend]} package is not "
                              f"installed: {EXTRAS[backend]}, or drop {backend} from logging.backends")


def resolve_answer_limit(cfg: RunConfig, limit: int) -> RunConfig:
    """``task.max_answer_tokens`` unset: ``limit``, the loaded task's own (the built-in task's 8; a dataset's
    longest reference answer + EOS + 25%), written into the run's config so every actor uses the same number."""
    if cfg.task.max_answer_tokens is not None:
        return cfg
    log.info("task.max_answer_tokens", value=limit, detail="derived from the data (set task.max_answer_tokens to "
             "choose)")
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, max_answer_tokens=limit))


def resolve_router_replay(cfg: RunConfig) -> RunConfig:
    """The run's router replay for its model: a dense ``model.init_from`` (no MoE routers) runs with replay off
    and no route capture, with one warning; an MoE family without an adapter raises a ConfigError naming the fix
    (engine/modeling/adapters.py) unless ``learner.router_replay=off``. The built-in model is MoE: unchanged."""
    if cfg.model.init_from is None:
        return cfg
    from transformers import AutoConfig

    from engine.modeling.adapters import effective_replay

    config = AutoConfig.from_pretrained(cfg.model.init_from)
    try:
        mode = effective_replay(config, cfg.learner.router_replay,
                                warn=lambda message: log.warning("router_replay.off", detail=message))
    except ValueError as e:
        raise ConfigError(f"model.init_from={cfg.model.init_from}: {e}") from None
    if mode == cfg.learner.router_replay:
        return cfg
    return dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, router_replay=mode),
                               rollout=dataclasses.replace(cfg.rollout, return_routes=False))


def _run_state(cfg: RunConfig, run_dir: Path) -> None:
    from engine.coordinator.checkpoint import latest

    ckpts = run_dir / "checkpoints"
    if not cfg.resume and not cfg.overwrite and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints of an earlier run: pass resume=true to continue "
                          "it, overwrite=true to replace it, or another name=...")
    if not cfg.resume:
        return
    if latest(run_dir) is None:
        raise ConfigError(f"resume=true but {ckpts} holds no complete checkpoint (train.checkpoint_every saves "
                          "them); drop resume=true to start afresh")


def _same_as_saved(cfg: RunConfig, saved_path: Path) -> None:
    """On resume: the model shape and the task must be those of the run (its saved config.yaml, kept)."""
    if not saved_path.exists():
        return
    saved = load_resolved(saved_path)
    for section in ("model", "task"):
        old, new = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(cfg, section))
        for key in old:
            if key != "dtype" and old[key] != new.get(key):
                raise ConfigError(f"resume=true but {section}.{key}={new.get(key)!r} differs from the run's "
                                  f"{old[key]!r} ({saved_path}, kept); pass {section}.{key}={old[key]!r} "
                                  "or start a new run with another name=...")


def _existing(run_dir: Path) -> Path:
    """``run_dir``, or its nearest ancestor that exists (where the run's folder would be created)."""
    while not run_dir.exists():
        run_dir = run_dir.parent
    return run_dir


def _writable(run_dir: Path) -> None:
    probe_dir = _existing(run_dir)
    if not probe_dir.is_dir():
        raise ConfigError(f"out_dir: {probe_dir} is a file, not a folder; pass out_dir=<a folder>")
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as e:
        raise ConfigError(f"out_dir: cannot write in {probe_dir} ({e.strerror}); pass a writable out_dir=...") \
            from None


_MIN_FREE_WEIGHTS = 4  # one checkpoint: the learner's model and two Adam moments, and the policy copy


def _free_space(run_dir: Path, weights_bytes: int) -> None:
    """The run folder's disk has room for at least one checkpoint (``_MIN_FREE_WEIGHTS`` x the weights); a long
    run needs about 15 x (two checkpoints kept, one being written, two or three weight versions). Below the
    minimum the first checkpoint would fail with ENOSPC, so the run is refused before it starts."""
    import shutil

    folder, need = _existing(run_dir), _MIN_FREE_WEIGHTS * weights_bytes
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ConfigError(f"out_dir: {folder} has {_mb(free)} free, less than the {_mb(need)} a run needs "
                          f"({_MIN_FREE_WEIGHTS} x the model's {_mb(weights_bytes)} of weights: one checkpoint); "
                          "free space on that disk or pass out_dir=<a folder on a disk with room>")


def _weights_bytes(cfg: RunConfig, task) -> int:
    """The size of the model's weights: the files of ``model.init_from``, or the built-in model's parameters
    (built on the meta device: nothing allocated)."""
    if cfg.model.init_from is not None:
        return sum(p.stat().st_size for p in Path(cfg.model.init_from).iterdir()
                   if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file())
    import torch

    from engine.modeling.model import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, task.tokenizer.vocab_size, seed=0)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _model_folder(path: str) -> None:
    folder, key = Path(path), f"model.init_from={path}"
    if not folder.is_dir():
        raise ConfigError(f"{key}: no such folder; pass an HF save_pretrained folder (config.json, weights, tokenizer)")
    try:
        json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: no config.json in it; pass an HF save_pretrained folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: config.json does not parse ({e}); re-save the model with save_pretrained") \
            from None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for unknown or broken configs
        raise ConfigError(f"{key}: config.json is not a model transformers knows ({_first_line(e)})") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(f"{key}: model_type {config.model_type!r} has no causal-LM class in transformers "
                          "(AutoModelForCausalLM); pass a causal language model")
    from engine.data.tokenizer import HFTokenizer

    try:
        tok = HFTokenizer(str(folder))
    except Exception as e:
        raise ConfigError(f"{key}: its tokenizer does not load ({_first_line(e)}); save one with "
                          "tokenizer.save_pretrained into the folder") from None
    vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and tok.vocab_size > vocab:
        raise ConfigError(f"{key}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab}; "
                          "use the tokenizer the model was trained with (or resize its embeddings)")


def _task(cfg: RunConfig):
    from engine.data.tasks import load_task, read_pool

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            task = load_task(cfg)
            if cfg.task.train_pool:
                read_pool(cfg.task.train_pool)
        except (ValueError, OSError) as e:
            raise ConfigError(_first_line(e)) from None
    for w in caught:
        log.warning("data.warning", detail=str(w.message))
    if cfg.task.name != "arithmetic":
        too_long, checked, longest = task.long_answers()
        if too_long:
            log.warning("data.answers_too_long", detail=f"{too_long} of {checked} held-out reference answers are "
                        f"longer than task.max_answer_tokens={cfg.task.max_answer_tokens} (the longest needs "
                        f"{longest} tokens with eos); pass task.max_answer_tokens={longest}")
        if task.train_set is not None and len(task.train_set) < cfg.train.groups_per_step:
            log.warning("data.few_training_prompts", detail=f"{len(task.train_set)} training prompts, fewer than "
                        f"train.groups_per_step={cfg.train.groups_per_step}: every step repeats prompts")
    return task


def _plugin(cfg: RunConfig) -> None:
    from engine.rewards.plugins import resolve

    name = cfg.reward.judge.verifier if cfg.reward.plugin == "judge" else cfg.reward.plugin
    try:
        resolve(name)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        raise ConfigError(f"reward.plugin={name}: {_first_line(e)}") from None


def _port(host: str, port: int) -> None:
    if not port:
        return  # 0 = a free port chosen at start
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"transport.port={port}: cannot bind {host}:{port} ({e.strerror}); another process "
                              "uses it: pass another transport.port or transport.port=0") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

