"""The rollout-backend seam: what a backend gives the rollout worker (actors/rollout_worker.py) and the judge.

Torch-free (``typing.Protocol`` only): the simulated backend runs workers without importing torch, and
configs/schema.py reads backend names from engine/backends/registry.py next to this file.

The worker owns the actor side (messages, queue, cancels, weight pacing, chunked streaming); a backend owns
generation. Per worker the backend hands out one ``RolloutBatch``: the worker admits ``Row`` records
(engine/modeling/rows.py) into it, calls ``step`` in a thread between messages, reads every row's tokens,
log-probs, versions and routes, and removes the rows it has fully sent or cancelled. A backend fills rows only
through ``Row.extend``. Implementations: engine/backends/hf.py (transformers, engine/modeling/decode.py),
sglang.py (an sglang server over HTTP), sim.py (simulated tokens and cost-model time).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from engine.modeling.rows import Row


@runtime_checkable
class RolloutBatch(Protocol):
    """A running batch of responses that rows join and leave between steps (continuous batching)."""

    rows: list[Row]
    """Every row added and not yet removed, finished ones included, in admission order."""

    @property
    def active(self) -> int:
        """How many rows are unfinished: the worker admits new rows while this is under its batch limit."""

    def add(self, rows: list[Row]) -> None:
        """Admit rows (fresh prompts or continuations with a prefix); they are decoded from the next ``step``."""

    def step(self, version: int) -> None:
        """Advance every unfinished row (by one token or more) and record ``version`` on each new token.
        Blocking and thread-safe with respect to the worker's event loop: it is called from a thread."""

    def remove(self, rows: list[Row]) -> None:
        """Drop rows: finished ones the worker has sent, or unfinished ones it cancels (their work stops)."""

    def invalidate(self) -> None:
        """New weights with ``rollout.kv_on_update=recompute``: recompute every unfinished row's KV cache under
        them before its next token."""


@runtime_checkable
class RolloutBackend(Protocol):
    """One rollout worker's generation engine, built by a registry factory (engine/backends/registry.py)."""

    def new_batch(self, *, capture_routes: bool) -> RolloutBatch:
        """The worker's batch; with ``capture_routes`` rows get per-token MoE routes (and prompt routes)."""

    def run_decode(self, decode_chunk: Callable[[], None]) -> Awaitable[None]:
        """Run ``decode_chunk`` (a few ``step`` calls) without blocking the event loop (heartbeats keep going)."""

    def load_async(self, path: str, digest: str = "") -> Awaitable[None]:
        """Swap in the policy weights in the safetensors file ``path`` between two steps; the worker then
        records the new version on every later token. The bytes served are the bytes checked against ``digest``
        (engine/backends/weights_file.py ``read_verified``); a file that fails raises ``WeightsRejected`` with the
        current weights untouched (the worker retries, then keeps serving them)."""

    def stack_routes(self, routes: list[np.ndarray]) -> np.ndarray:
        """Per-token routes [layers, k] -> one [T, layers, k] array (the right empty shape for T = 0); raise a
        one-line ``ValueError`` naming the fix when the backend records no routes."""


@runtime_checkable
class JudgeBackend(Protocol):
    """A generative judge's model (engine/rewards/judge.py): text prompts in, text verdicts out."""

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[str]:
        """One completion per prompt, in order."""
