"""Tiny HF checkpoints built locally (no downloads) for the bring-your-own-model tests: a byte-level BPE tokenizer
trained on the test's own data, and random-init Llama (dense) / Qwen2-MoE (shared experts) models that fit it."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def unicode_rows(n: int = 48) -> list[dict]:
    """Prompt/answer pairs with non-ASCII text (the built-in character tokenizer rejects them)."""
    words = ["café", "naïve", "über", "東京", "Ωmega", "jalapeño"]
    return [{"prompt": f"{words[i % len(words)]} {i} → ?", "answer": f"{words[(i + 1) % len(words)]}{i % 7}"}
            for i in range(n)]


def make_tokenizer(texts: list[str], out: Path):
    """A byte-level BPE tokenizer trained on ``texts``, saved as an HF folder; returns the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(str(out))
    return hf


def make_model(kind: str, out: Path, tokenizer, *, seed: int = 0) -> Path:
    """A tiny random-init ``llama`` (dense) or ``qwen2_moe`` model for ``tokenizer``, saved with it at ``out``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False)
    if kind == "llama":
        config = LlamaConfig(intermediate_size=64, head_dim=16, **ids)
    elif kind == "qwen2_moe":
        config = Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, **ids)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
