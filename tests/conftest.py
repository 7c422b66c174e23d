"""Shared test settings: one DeepSpeed JIT cache for every test, and no stray outputs in the repo."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds a CPU op on first init (~30 s); keep one cache for the whole suite (and across runs).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
