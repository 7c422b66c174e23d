"""Published weight files and their digests: what the learner computes once and every rollout worker checks.

The learner writes ``weights/policy_v{k}.safetensors`` atomically (temp file, fsync, rename) and sends its digest
(``sha256:<hex>`` of the file's bytes) with the train result; ``LoadWeights`` carries it to every worker. A backend
reads the file once into memory, hashes those bytes and loads from the same bytes (``read_verified``), so what it
checks is exactly what it serves. A file that is missing, torn, truncated, flipped or another version's raises
``WeightsRejected`` before anything changes; the rollout worker (actors/rollout_worker.py) retries with backoff and
otherwise keeps serving its previous version.

Torch-free (hashlib only): the simulated learner hashes its stand-in file without importing torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

log = structlog.get_logger()

ALGORITHM = "sha256"  # measured against blake2b in docs/guides/reliability.md ("Weight integrity")
_CHUNK = 1 << 20
T = TypeVar("T")


class WeightsRejected(ValueError):
    """A weights file failed verification; the caller's model is untouched. ``reason`` is ``digest_mismatch``,
    ``unreadable`` (missing or unreadable file) or ``unparseable`` (bytes that are not a safetensors file)."""

    def __init__(self, path: str, reason: str, message: str) -> None:
        super().__init__(f"weights {path} refused ({reason}): {message}")
        self.path, self.reason = path, reason


def digest_bytes(data: bytes | memoryview) -> str:
    return f"{ALGORITHM}:{hashlib.new(ALGORITHM, data).hexdigest()}"


def digest_file(path: str | os.PathLike) -> str:
    """The digest of a file's bytes, read in 1 MiB pieces (no whole-file copy in memory)."""
    with open(path, "rb") as f:
        return digest_fd(f.fileno())


def digest_fd(fd: int) -> str:
    """``digest_file`` of an open file descriptor, read from offset 0 (its position is left unchanged)."""
    h, offset = hashlib.new(ALGORITHM), 0
    while piece := os.pread(fd, _CHUNK, offset):
        h.update(piece)
        offset += len(piece)
    return f"{ALGORITHM}:{h.hexdigest()}"


def _digest_as(data: bytes, expected: str) -> str:
    algorithm, sep, _ = expected.partition(":")
    if not sep or algorithm not in hashlib.algorithms_guaranteed:
        return f"unsupported digest {expected!r:.80}"
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def read_verified(path: str, digest: str, parse: Callable[[bytes], T]) -> T:
    """``parse`` of the bytes of ``path``, read once, after checking them against ``digest`` ("" = no digest known:
    only ``parse`` can notice a torn file). One attempt: raises ``WeightsRejected`` (logged with its reason)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        log.warning("weights.unreadable", path=path, error=str(e))
        raise WeightsRejected(path, "unreadable", str(e)) from None
    if digest and (got := _digest_as(data, digest)) != digest:
        log.warning("weights.digest_mismatch", path=path, expected=digest, got=got, bytes=len(data))
        raise WeightsRejected(path, "digest_mismatch", f"expected {digest}, got {got} ({len(data)} bytes)")
    if not digest:
        log.info("weights.unverified", path=path, detail="no digest was sent with these weights")
    try:
        return parse(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a torn header
        log.warning("weights.unparseable", path=path, error=f"{type(e).__name__}: {e}", bytes=len(data))
        raise WeightsRejected(path, "unparseable", f"{type(e).__name__}: {e}") from None


def file_state(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(inode, size, mtime ns) of ``path``, None when it is missing: a rename over it changes the tuple."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
