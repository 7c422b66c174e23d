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


# family -> (transformers config class, its MoE keys, MoE layer count): tiny, with a dense layer where the family
# has one (mlp_only_layers, first_k_dense_replace); also used by tests/engine/test_adapters.py
MOE_FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, intermediate_size=32, mlp_only_layers=[1],
                                         norm_topk_prob=True), 2),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, intermediate_size=32, mlp_only_layers=[0],
                                         shared_expert_intermediate_size=16), 2),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                      intermediate_size=16), 2),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                                  intermediate_size=16), 2),
    "deepseek_v3": ("DeepseekV3Config", dict(num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                                             n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
                                             moe_intermediate_size=16, intermediate_size=32, q_lora_rank=16,
                                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=8, routed_scaling_factor=2.5,
                                             num_key_value_heads=4), 2),
    "gpt_oss": ("GptOssConfig", dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                     intermediate_size=16, sliding_window=4,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                     layer_types=["sliding_attention", "full_attention"]), 2),
}
DENSE_FAMILIES = {"llama": ("LlamaConfig", dict(num_hidden_layers=2, intermediate_size=64)),
                  "qwen3": ("Qwen3Config", dict(num_hidden_layers=2, intermediate_size=64))}


def make_model(kind: str, out: Path, tokenizer, *, seed: int = 0) -> Path:
    """A tiny random-init model of family ``kind`` (a key of MOE_FAMILIES or DENSE_FAMILIES) for ``tokenizer``,
    saved with it at ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)
    cls, keys = (MOE_FAMILIES[kind][:2] if kind in MOE_FAMILIES else DENSE_FAMILIES[kind])
    config = getattr(transformers, cls)(**{**ids, **keys})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
