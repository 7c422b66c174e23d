"""Continuous batched decoding for the transformers backend.

Rows (one response each) join and leave a running batch, weights may change between decode steps, and every
sampled token records its behaviour log-prob, the policy version that sampled it and, optionally, its MoE routes.

One ``step`` feeds each active row its newest token (or, after a rebuild, its whole prompt + response so far in a
prefill), then samples the next token of every active row. A rebuild (a fresh KV cache from one left-padded
prefill) happens when rows were added, when finished rows take more than half of the batch, and after
``invalidate()``: that is how a worker recomputes the KV cache under new weights. Without ``invalidate()`` after a
weight change the cache is kept: keys and values of earlier positions stay those of the old weights (cheaper; the
tokens' recorded versions and log-probs are still exact for what was sampled).

Routes: ``routes[j]`` is the routing computed when token j was first fed to the model, so a token becomes
*ready* (``Row.ready``) once it has been fed; a response's final token is never fed and is ready when the row
finishes. Emitting only ready tokens keeps each streamed chunk's routes paired with its tokens.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import DynamicCache

from engine.modeling.routing import route_dtype, route_hooks, route_shape
from engine.modeling.rows import Row

_COMPACT_DONE_FRAC = 0.5  # rebuild once finished rows are more than this fraction of the batch


class DecodeBatch:
    def __init__(self, model, *, eos_id: int, pad_id: int, capture_routes: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.capture_routes, self.generator = capture_routes, generator
        self.rows: list[Row] = []  # every row not yet removed by the caller
        self._cached: list[Row] = []  # rows in KV-cache order (done rows keep their slot until a rebuild)
        self._cache = self._mask_BL = self._pos_B1 = None
        self._rebuild = True
        self._route_dtype = route_dtype(route_shape(model)[2]) if capture_routes else None

    def add(self, rows: list[Row]) -> None:
        for r in rows:
            if len(r.tokens) >= r.max_new_tokens and not r.done:  # a continuation already at its limit
                r.finish_reason = "length"
        self.rows.extend(rows)
        self._rebuild = True

    def remove(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        self.rows = [r for r in self.rows if id(r) not in gone]
        if any(id(r) in gone and not r.done for r in self._cached):
            self._rebuild = True  # a cancelled row still holds a slot that would be decoded

    def invalidate(self) -> None:
        """Recompute the KV cache (of every unfinished row) before the next step, e.g. under new weights."""
        self._rebuild = True

    @property
    def active(self) -> int:
        return sum(not r.done for r in self.rows)

    @torch.no_grad()
    def step(self, version: int) -> None:
        """Feed every unfinished row and sample its next token (with ``version`` recorded on it)."""
        if not self.active:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            done_frac = sum(r.done for r in self._cached) / max(len(self._cached), 1)
            with route_hooks(self.model) if self.capture_routes else nullcontext() as calls:
                if self._rebuild or done_frac > _COMPACT_DONE_FRAC:
                    logits_BV = self._prefill()
                else:
                    logits_BV = self._decode()
            if self.capture_routes:
                self._record_routes(calls)
            self._sample(logits_BV, version)
        finally:
            self.model.train(was_training)

    # ---- internals ---------------------------------------------------------------------------------------

    def _prefill(self) -> torch.Tensor:
        self._cached = [r for r in self.rows if not r.done]
        seqs = [r.prompt + r.tokens for r in self._cached]
        B, L = len(seqs), max(map(len, seqs))
        ids_BL = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((B, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_BL[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask_BL[i, L - len(s):] = 1
        pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        self._cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos_BL, cache=self._cache,
                         use_cache=True, logits_to_keep=1)
        self._mask_BL, self._pos_B1 = mask_BL, pos_BL[:, -1:] + 1
        self._rebuild, self._fed = False, ("prefill", L)
        return out.logits[:, -1]

    def _decode(self) -> torch.Tensor:
        tok_B1 = torch.tensor([[r.tokens[-1] if not r.done else self.pad_id] for r in self._cached],
                              dtype=torch.long)
        self._mask_BL = torch.cat([self._mask_BL, torch.ones((len(self._cached), 1), dtype=torch.long)], dim=1)
        out = self.model(input_ids=tok_B1, attention_mask=self._mask_BL, position_ids=self._pos_B1,
                         cache=self._cache, use_cache=True)
        self._pos_B1 = self._pos_B1 + 1
        self._fed = ("decode", 1)
        return out.logits[:, -1]

    def _record_routes(self, calls) -> None:
        kind, length = self._fed
        B = len(self._cached)
        routes = calls.stacked(0).reshape(B, length, len(calls.calls), -1).numpy().astype(self._route_dtype)
        for i, r in enumerate(self._cached):
            if r.done:
                continue
            n = len(r.prompt) + len(r.tokens)  # real positions of this row, right-aligned in the input
            row = routes[i, length - n:] if kind == "prefill" else routes[i, -1:]
            first_pos = n - len(row)  # position of row[0] in prompt + tokens
            if r.want_prompt_routes and r.prompt_routes is None and first_pos == 0:
                r.prompt_routes = row[:len(r.prompt)].copy()
            start = r.route_base + len(r.routes)  # first token without a route
            r.routes.extend(row[len(r.prompt) + start - first_pos:len(r.prompt) + len(r.tokens) - first_pos])

    def _sample(self, logits_BV: torch.Tensor, version: int) -> None:
        temps_B = torch.tensor([r.temperature for r in self._cached], dtype=torch.float32)
        greedy_B = temps_B <= 0
        logp_BV = torch.log_softmax(logits_BV.float() / torch.where(greedy_B, 1.0, temps_B)[:, None], dim=-1)
        tok_B = torch.multinomial(logp_BV.exp(), 1, generator=self.generator).squeeze(1)
        tok_B = torch.where(greedy_B, logp_BV.argmax(-1), tok_B)
        logp_B = logp_BV.gather(1, tok_B[:, None]).squeeze(1)
        for r, tok, lp in zip(self._cached, tok_B.tolist(), logp_B.tolist()):
            if r.done:
                continue
            r.tokens.append(tok)
            r.logprobs.append(lp)
            r.versions.append(version)
            if tok == self.eos_id:
                r.finish_reason = "stop"
            elif len(r.tokens) >= r.max_new_tokens:
                r.finish_reason = "length"
