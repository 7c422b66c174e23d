"""The tokenizer seam: the built-in character tokenizer, or the one saved with ``model.init_from``.

Both expose what the engine uses: ``encode`` (no special tokens), ``decode`` (up to the first eos, specials
skipped), ``prompt_ids`` (what a prompt is fed to the model as: bos + text, or the chat template for
``messages``), ``pad_id``/``bos_id``/``eos_id``, ``vocab_size``, and ``fingerprint`` (a stable string naming
the vocabulary, for cache keys). ``save`` writes an HF tokenizer folder (the exported policy carries it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from configs.schema import ModelConfig

_SPECIALS = ("<pad>", "<bos>", "<eos>")
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


def render_messages(messages) -> str:
    """A chat as plain text, for tokenizers without a chat template (and as a prompt's identity)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant: "


class CharTokenizer:
    """One id per character: 0 pad, 1 bos, 2 eos, then newline and printable ASCII (98 ids in all)."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.vocab: list[str] = list(_SPECIALS) + list(_CHARS)
        self._ids = {ch: i for i, ch in enumerate(self.vocab) if i >= len(_SPECIALS)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def fingerprint(self) -> list[str]:
        return self.vocab  # the SFT cache keys of earlier versions hashed exactly this list

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer vocabulary (the built-in one has newline "
                             "and printable ASCII only); set model.init_from to a model with its own tokenizer") from None

    def decode(self, ids: list[int]) -> str:
        """Text up to the first eos; pad and bos are skipped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(_SPECIALS):
                out.append(self.vocab[i])
        return "".join(out)

    def prompt_ids(self, text: str, messages=None) -> list[int]:
        return [self.bos_id] + self.encode(render_messages(messages) if messages else text)

    def save(self, path: str | os.PathLike) -> None:
        """An HF fast tokenizer with the same ids (one token per character), loadable by AutoTokenizer."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(self.vocab)}, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                eos_token="<eos>").save_pretrained(str(path))


class HFTokenizer:
    """An HF tokenizer (AutoTokenizer) behind the same interface; any Unicode text works."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {path} has no eos token; set eos_token in its tokenizer_config.json")
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self.has_chat_template = bool(getattr(self._tok, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @functools.cached_property
    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
        return hashlib.sha256(vocab.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, text: str, messages=None) -> list[int]:
        if messages and self.has_chat_template:
            out = self._tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        bos = [] if self.bos_id is None else [self.bos_id]
        return bos + self.encode(render_messages(messages) if messages else text)

    def save(self, path: str | os.PathLike) -> None:
        self._tok.save_pretrained(str(path))


@functools.lru_cache(maxsize=8)
def _hf(path: str) -> HFTokenizer:
    return HFTokenizer(path)


def load_tokenizer(cfg: ModelConfig) -> CharTokenizer | HFTokenizer:
    """The tokenizer of ``model.init_from`` (loaded once per process), else the built-in character tokenizer."""
    if cfg.init_from is None:
        return CharTokenizer()
    return _hf(str(Path(cfg.init_from).resolve()))
