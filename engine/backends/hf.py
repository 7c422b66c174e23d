"""The transformers backend (``rollout.backend=hf``, the embedded CPU default; ``reward.judge.backend=hf``).

``HFBackend``: the policy as a transformers model, decoded by engine/modeling/decode.py's ``DecodeBatch`` (the
``RolloutBatch`` of engine/backends/base.py). torch is imported inside the functions, not at module level, so that
reading this module (and the registry naming it) never imports torch.

``HFJudgeBackend``: the same backend with a frozen judge model: the run's initial policy by default (the tiny model
in tests and in the built-in run: it emits mostly unparseable verdicts, which are recorded as failures), or any HF
folder (``reward.judge.model``), tokenized by its own tokenizer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np


class HFBackend:
    """transformers model on the CPU, decoded by engine/modeling/decode.py."""

    def __init__(self, init_dir: str, *, seed: int, eos_id: int, pad_id: int, dtype: str = "float32") -> None:
        import torch

        from engine.modeling.model import load_model

        self.model = load_model(init_dir, dtype).eval()
        self._gen = torch.Generator().manual_seed(seed)
        self.eos_id, self._pad_id = eos_id, pad_id

    def load(self, path: str, digest: str = "") -> None:
        """Swap in the weights of ``path`` read once and checked against ``digest`` (engine/backends/weights_file.py):
        a file that fails raises ``WeightsRejected`` and leaves the model as it was."""
        from safetensors.torch import load as load_bytes

        from engine.backends.weights_file import read_verified
        from engine.modeling.model import apply_state

        apply_state(self.model, read_verified(path, digest, load_bytes), path)

    async def load_async(self, path: str, digest: str = "") -> None:
        await asyncio.to_thread(self.load, path, digest)

    def new_batch(self, *, capture_routes: bool):
        from engine.modeling.decode import DecodeBatch

        return DecodeBatch(self.model, eos_id=self.eos_id, pad_id=self._pad_id, capture_routes=capture_routes,
                           generator=self._gen)

    async def run_decode(self, decode_chunk) -> None:
        """Run ``decode_chunk`` (some decode steps) in a thread, so heartbeats keep flowing."""
        await asyncio.to_thread(decode_chunk)

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        from engine.modeling.model import stack_routes

        return stack_routes(routes, self.model)


def build(cfg, init_dir: str, worker_id: int) -> HFBackend:
    """Rollout worker ``worker_id``'s backend (engine/backends/registry.py)."""
    import torch

    from engine.data.tokenizer import load_tokenizer

    torch.set_num_threads(cfg.rollout.threads_per_worker)  # processes sharing a machine must split its cores
    tok = load_tokenizer(cfg.model)
    return HFBackend(init_dir, seed=cfg.seed * 1000 + worker_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     dtype=cfg.model.dtype)


# ---- the generative judge ------------------------------------------------------------------------------------


class HFJudgeBackend:
    def __init__(self, model_dir: str, *, tokenizer=None, seed: int = 0) -> None:
        if tokenizer is None:  # an HF folder with its own tokenizer
            from transformers import AutoTokenizer

            tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(model_dir))
        self.tokenizer = tokenizer
        self.backend = HFBackend(model_dir, seed=seed, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        self._max_positions = int(getattr(self.backend.model.config, "max_position_embeddings", 1 << 30))

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        import torch

        from engine.modeling.model import generate

        ids = [self.tokenizer.encode_prompt(p)[-(self._max_positions - max_new_tokens):] for p in prompts]
        with torch.no_grad():
            outs = generate(self.backend.model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        return [self.tokenizer.decode(o.token_ids) for o in outs]


class _HFTokenizer:
    def __init__(self, tok) -> None:
        self._tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode_prompt(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class CharJudgeTokenizer:
    """The built-in task's character tokenizer (the tiny model's): bos + characters."""

    def __init__(self, tok) -> None:
        self._tok, self.eos_id, self.pad_id = tok, tok.eos_id, tok.pad_id

    def encode_prompt(self, text: str) -> list[int]:
        return self._tok.prompt_ids(text)  # bos (when the tokenizer has one) + the text

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def build_judge(cfg, init_dir: str | None, char_tokenizer) -> HFJudgeBackend:
    """The judge model: ``reward.judge.model`` (with its own tokenizer when the folder has one) or the run's
    initial policy with the task's character tokenizer (engine/backends/registry.py)."""
    j = cfg.reward.judge
    model_dir = j.model or init_dir
    if model_dir is None:
        raise ValueError("reward.judge.model is not set and the reward worker got no --init policy to judge with; "
                         "pass reward.judge.model=/path/to/hf_model")
    own_tokenizer = j.model is not None and any(
        (Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return HFJudgeBackend(model_dir, tokenizer=None if own_tokenizer else CharJudgeTokenizer(char_tokenizer),
                          seed=cfg.seed)
