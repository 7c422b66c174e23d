"""Judge backends: the generative judge's model served through the rollout backends (engine/rewards/judge.py calls
``generate(prompts, max_new_tokens=..., temperature=...) -> texts``).

- ``HFJudgeBackend``: the rollout workers' transformers backend (``actors.rollout_worker.HFBackend``, decoded by
  ``engine/modeling/decode.py``), here with a frozen judge model: the run's initial policy by default (the tiny model in
  tests and in the built-in run: it emits mostly unparseable verdicts, which are recorded as failures), or any HF
  folder (``reward.judge.model``), tokenized by its own tokenizer.
- ``SglangJudgeBackend``: a running sglang server's native ``/generate`` endpoint with text prompts, one batched
  request per group (the same endpoint and sampling fields as actors/sglang_backend.py).
"""

from __future__ import annotations

from pathlib import Path

from actors.rollout_worker import HFBackend
from configs.schema import JudgeConfig, RunConfig


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
        return [self._tok.bos_id] + self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


class SglangJudgeBackend:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        from actors.sglang_backend import SGLangClient

        self.client = SGLangClient(url, timeout_s=timeout_s)

    @staticmethod
    def payload(prompts: list[str], *, max_new_tokens: int, temperature: float) -> dict:
        return {"text": prompts, "sampling_params": {"temperature": float(temperature),
                                                     "max_new_tokens": int(max_new_tokens)}}

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        body = self.payload(prompts, max_new_tokens=max_new_tokens, temperature=temperature)
        return self.parse(self.client.post("/generate", body), len(prompts))

    @staticmethod
    def parse(items, num: int) -> list[str]:
        items = [items] if isinstance(items, dict) else items
        if len(items) != num:
            raise ValueError(f"sglang returned {len(items)} results for {num} judge prompts")
        return [str(item["text"]) for item in items]


def build_judge_backend(cfg: RunConfig, init_dir: str | None, char_tokenizer):
    """The judge backend a reward worker uses for ``reward.plugin=judge``."""
    j: JudgeConfig = cfg.reward.judge
    if j.backend == "sglang":
        return SglangJudgeBackend(j.url, timeout_s=j.timeout_s)
    model_dir = j.model or init_dir
    if model_dir is None:
        raise ValueError("reward.judge.model is not set and the reward worker got no --init policy to judge with; "
                         "pass reward.judge.model=/path/to/hf_model")
    own_tokenizer = j.model is not None and any(
        (Path(model_dir) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return HFJudgeBackend(model_dir, tokenizer=None if own_tokenizer else CharJudgeTokenizer(char_tokenizer),
                          seed=cfg.seed)
