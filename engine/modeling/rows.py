"""One response being generated: the record a rollout backend fills token by token (torch-free, so that the
simulated backend runs without importing torch)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Row:
    """One response being generated. ``tokens`` may start with a prefix generated elsewhere (a continuation):
    the first ``emitted`` tokens are already known to the caller, routes start at token ``route_base``."""

    key: Hashable
    prompt: list[int]
    max_new_tokens: int  # limit on len(tokens), prefix included
    temperature: float  # 0 = greedy
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routes: list[np.ndarray] = field(default_factory=list)  # [layers, k] per token from route_base on
    route_base: int = 0
    prompt_routes: np.ndarray | None = None
    want_prompt_routes: bool = False
    emitted: int = 0
    finish_reason: str | None = None  # "stop" | "length" once done

    @classmethod
    def continuing(cls, key: Hashable, prompt: list[int], prefix: list[int], **kw) -> Row:
        """A row that resumes after ``prefix`` (tokens the caller already has, with their routes)."""
        n = len(prefix)
        return cls(key=key, prompt=list(prompt), tokens=list(prefix), logprobs=[float("nan")] * n,
                   versions=[-1] * n, route_base=n, emitted=n, **kw)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def ready(self, routed: bool) -> int:
        """How many tokens can be handed out: fed ones (their routes are known), or all once finished."""
        if self.done or not routed:
            return len(self.tokens)
        return self.route_base + len(self.routes)
