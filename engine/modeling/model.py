"""The policy: a tiny Qwen3-MoE built locally (or any HF causal LM, ``load_model``), its weights on disk, the
exported HF folder (``export_policy``), batched decoding and token log-probs.

``generate`` is a hand-written KV-cache decode loop (about 5x the throughput of HF ``generate`` on CPU at
batch 512) that also returns the behaviour log-prob of every sampled token. ``token_logprobs`` recomputes
the same quantity with gradients for the learner. Shapes: B = sequences, L = padded length, V = vocab.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from configs.schema import ModelConfig
from engine.backends.weights_file import digest_file
from engine.algo.entropy import logprobs_and_entropy
from engine.modeling.decode import DecodeBatch, Row
from engine.modeling.routing import route_dtype, route_shape

log = structlog.get_logger()


def build_model(cfg: ModelConfig, vocab_size: int, *, seed: int, pad_id: int = 0, bos_id: int = 1,
                eos_id: int = 2, init_std: float = 0.02) -> Qwen3MoeForCausalLM:
    """Random-init fp32 model (no download); weights ~ N(0, init_std). Default experts implementation (grouped_mm)
    is kept."""
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size, intermediate_size=cfg.moe_intermediate_size * cfg.top_k,
        max_position_embeddings=cfg.max_position_embeddings,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, use_cache=True, initializer_range=init_std)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).float()


def load_model(path: str | os.PathLike, dtype: str = "float32") -> torch.nn.Module:
    """Any HF causal-LM folder (its own architecture, via AutoModelForCausalLM), weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    model.save_pretrained(str(path))


def newest_weights(weights_dir: str | os.PathLike, version: int | None) -> Path | None:
    """``weights_dir/policy_v{version}.safetensors`` (what the learner published last), None for version 0."""
    return Path(weights_dir) / f"policy_v{version}.safetensors" if version else None


def export_policy(init_dir: str, weights_file: str | os.PathLike | None, tokenizer, out: str | os.PathLike,
                  dtype: str = "float32") -> Path:
    """Write the policy as a complete HF folder at ``out`` (config, safetensors, generation config, tokenizer):
    the model of ``init_dir`` with the weights of ``weights_file`` (None: the initial weights). Loadable with
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``; written beside ``out`` first,
    then swapped in."""
    from transformers import GenerationConfig

    out = Path(out)
    model = load_model(init_dir, dtype)
    if weights_file is not None:
        load_weights(model, weights_file)
    bos = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if getattr(model, "generation_config", None) is None:
        model.generation_config = GenerationConfig()
    for c in (model.config, model.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = bos, tokenizer.eos_id, tokenizer.pad_id
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk keeps no half folder; the previous export stays
        raise
    shutil.rmtree(out, ignore_errors=True)  # the previous export of this same run
    os.replace(tmp, out)
    return out


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> str:
    """Write the state dict as one safetensors file atomically (a reader never sees a partial file); returns the
    digest of the bytes written (engine/backends/weights_file.py), which ``LoadWeights`` carries to the workers."""
    return save_state(model.state_dict(), path)


def save_state(state: dict[str, torch.Tensor], path: str | os.PathLike) -> str:
    """``save_weights`` for a state dict. The digest is taken from the temporary file once it is fsynced and
    before the rename, so it is the digest of exactly what the rename publishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    try:
        save_file(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = digest_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # a full disk keeps no torn temporary file
        fault = disk_error(e, path)
        if fault is not None:
            raise fault from e
        raise
    return digest


def publish_state(state: dict[str, torch.Tensor], path: str | os.PathLike, *, version: int,
                  attempts: int = 3, wait_s: float = 1.0) -> str:
    """``save_state`` of weight version ``version``, tried ``attempts`` times ``wait_s``, 2 x ``wait_s``, ...
    apart when the disk fails (a transient EIO, space freed meanwhile), each failure logged as
    ``weights.write_failed`` with the path and the cause. Then an OSError naming the path, the cause and what
    it means: the version is not published, so no worker sees it (nor a torn file: the rename never happened),
    and the learner stops the run (actors/learner.py)."""
    for attempt in range(1, attempts + 1):
        try:
            return save_state(state, path)
        except OSError as e:
            log.error("weights.write_failed", path=str(path), error=e.strerror, errno=e.errno, attempt=attempt,
                      attempts=attempts)
            last = e
            if attempt < attempts:
                time.sleep(wait_s * 2 ** (attempt - 1))
    raise OSError(last.errno, f"{last.strerror}: weight version {version} could not be written after {attempts} "
                  f"attempts; the rollout workers keep version {version - 1}. Free space on that disk, then "
                  "resume=true continues from the newest checkpoint", str(path)) from last


def disk_error(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """``e``, raised while writing ``path``, as an ``OSError(errno, strerror, path)`` when it is a disk fault
    (ENOSPC, EIO, EFBIG, EROFS, ...); None for anything else (a bug: it propagates unchanged). The writers below
    Python do not raise OSError: safetensors raises ``SafetensorError("... (os error 28)")`` and torch.save
    (DeepSpeed's checkpoints) a bare ``RuntimeError`` ("unexpected pos ..."); the first carries its errno, the
    second is a disk fault when its message is one of the stream writer's, ENOSPC if the folder's disk is full."""
    if isinstance(e, OSError):
        return e if e.filename else OSError(e.errno, e.strerror, str(path))
    text = str(e)
    if m := re.search(r"os error (\d+)", text):
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    if isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE_FAILED):
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        try:
            full = shutil.disk_usage(folder).free < _FULL_BYTES
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return OSError(errno.EIO, f"write failed ({text.splitlines()[0] if text else type(e).__name__})",
                       str(path))
    return None


_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")  # torch.save's C++ writer
_FULL_BYTES = 1 << 20  # a disk with less free is full for the purpose of naming the cause


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the weights in ``path`` into ``model`` in place; every name and shape must match."""
    apply_state(model, load_file(str(path)), path)


def apply_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_weights`` for a state dict already read from ``path`` (named in the error)."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise ValueError(f"weights in {path} do not fit this model (built from a different model config?): "
                         f"missing={missing[:5]} unexpected={unexpected[:5]} "
                         f"shape mismatches={bad_shapes[:5]}")
    model.load_state_dict(state, strict=True)


class Generated(NamedTuple):
    """One sampled continuation. Routes (engine/modeling/routing.py) are None unless asked for: ``prompt_routes`` is
    [P, layers, k] (one row per prompt token) and ``routes`` [T - 1, layers, k], where ``routes[j]`` is the
    routing of ``token_ids[j]`` (the last token is never fed to the model, so it has none)."""

    token_ids: list[int]
    logprobs: list[float]
    prompt_routes: np.ndarray | None = None
    routes: np.ndarray | None = None


def generate(model: Qwen3MoeForCausalLM, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
             eos_id: int, pad_id: int, generator: torch.Generator | None = None, capture_routes: bool = False,
             ) -> list[Generated]:
    """Sample continuations for a batch of prompts -> per prompt its tokens, behaviour log-probs and routes.

    Token ids end with eos when the sequence stopped. The log-prob of each token is taken under the
    distribution it was drawn from: log_softmax(logits / temperature), or log_softmax(logits) when
    temperature == 0 (greedy). With ``capture_routes`` every MoE router's top-k ids are recorded by forward hooks
    during the prefill and every decode step (no second forward pass). One ``engine.modeling.decode.DecodeBatch`` run to
    completion: the rollout worker drives the same class step by step.
    """
    batch = DecodeBatch(model, eos_id=eos_id, pad_id=pad_id, capture_routes=capture_routes, generator=generator)
    rows = [Row(key=i, prompt=list(p), max_new_tokens=max_new_tokens, temperature=temperature,
                want_prompt_routes=capture_routes) for i, p in enumerate(prompts)]
    batch.add(rows)
    while batch.active:
        batch.step(0)
    return [Generated(r.tokens, r.logprobs, r.prompt_routes if capture_routes else None,
                      stack_routes(r.routes, model) if capture_routes else None) for r in rows]


def stack_routes(routes: list[np.ndarray], model) -> np.ndarray:
    """Per-token routes [layers, k] -> one [T, layers, k] array (empty with the right trailing shape)."""
    if routes:
        return np.stack(routes)
    layers, k, experts = route_shape(model)
    return np.zeros((0, layers, k), dtype=route_dtype(experts))


def token_logprobs(model: Qwen3MoeForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                   temperature: float = 1.0) -> torch.Tensor:
    """out_BL[:, t] = log p(input_ids[:, t] | input_ids[:, :t]) under softmax(logits / temperature);
    out_BL[:, 0] = 0. Right-padded inputs; differentiable. Values at padding positions are meaningless."""
    logits_BLV = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits_BLV = logits_BLV[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits_BLV = logits_BLV / temperature
    target_BL = input_ids[:, 1:]
    picked_BL = logits_BLV.gather(-1, target_BL[..., None]).squeeze(-1)
    logp_BL = picked_BL - torch.logsumexp(logits_BLV, dim=-1)
    return F.pad(logp_BL, (1, 0), value=0.0)


@torch.no_grad()
def old_policy_pass(model: Qwen3MoeForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                    temperature: float = 1.0, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The old-policy pass: (logp_BL, entropy_BL), where [:, t] are the log-prob of token t and the full-vocabulary
    entropy of the distribution it was drawn from (column 0 = 0). The LM head runs chunk by chunk over tokens
    (engine/algo/entropy.py), so no [B, L, V] tensor exists; peak extra memory is about 4 * chunk_tokens * V floats."""
    hidden_BLH = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logp_BL, entropy_BL = logprobs_and_entropy(hidden_BLH[:, :-1], model.lm_head.weight, input_ids[:, 1:],
                                               temperature=temperature, chunk_tokens=chunk_tokens)
    return F.pad(logp_BL, (1, 0), value=0.0), F.pad(entropy_BL, (1, 0), value=0.0)


def evaluate_greedy(model: Qwen3MoeForCausalLM, task, examples, batch_size: int = 512) -> float:
    """Greedy accuracy of ``model`` on ``examples`` (tasks.Example) scored by ``task.score``;
    responses are cut at task.max_answer_tokens, as in rollouts."""
    if not examples:
        return 0.0
    tok = task.tokenizer
    max_new = task.max_answer_tokens
    correct = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        outs = generate(model, [task.prompt_ids(ex) for ex in chunk], max_new_tokens=max_new, temperature=0.0,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)
        for ex, out in zip(chunk, outs):
            correct += task.score(tok.decode(out.token_ids), ex.answer)[0]
    return correct / len(examples)
