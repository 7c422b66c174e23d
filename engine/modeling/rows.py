"""One response being generated: the record a rollout backend fills token by token (torch-free, so that the
simulated backend runs without importing torch).

Backends extend a row only through ``Row.extend`` (tokens, their log-probs and policy version, the routes of the
positions fed so far, the finish reason); they never assign its fields. The rollout worker reads the fields and
keeps its own streaming position in ``emitted``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Row:
    """One response being generated. ``tokens`` may start with a prefix generated elsewhere (a continuation):
    the first ``emitted`` tokens are already known to the caller, routes start at token ``route_base``.
    A row that already holds ``max_new_tokens`` tokens is finished ("length") from the start."""

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

    def __post_init__(self) -> None:
        if self.finish_reason is None and len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"  # e.g. a continuation already at its limit

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

    def extend(self, tokens: Sequence[int], logprobs: Sequence[float], version: int, *,
               routes: Sequence[np.ndarray] | np.ndarray | None = None, routes_from: int = 0,
               finish: str | None = None) -> None:
        """Append sampled ``tokens`` (Python ints) with their behaviour ``logprobs`` (floats), all sampled under
        policy ``version``.

        ``routes[i]`` ([layers, k]) is the routing of position ``routes_from + i`` of ``prompt + tokens``; the row
        keeps the routes of its tokens it does not hold yet, up to the last position fed (every position but the
        newest token's), and the prompt's routes when it wants them and ``routes`` starts at position 0.
        ``finish`` ("stop" | "length") ends the response; reaching ``max_new_tokens`` ends it with "length".
        """
        self.tokens.extend(tokens)
        self.logprobs.extend(logprobs)
        self.versions.extend([version] * len(tokens))
        if routes is not None:
            p = len(self.prompt)
            if self.want_prompt_routes and self.prompt_routes is None and routes_from == 0:
                self.prompt_routes = np.array(routes[:p])
            have = self.route_base + len(self.routes)  # first token without a route
            self.routes.extend(routes[p + have - routes_from:p + len(self.tokens) - 1 - routes_from])
        if finish is not None:
            self.finish_reason = finish
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
