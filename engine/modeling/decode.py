"""Continuous batching for the transformers backend: rows join and leave a running batch without recomputing the
KV cache of any other row.

A step does at most two forwards:
- **decode**: every row already in the KV cache is fed its newest token (one position each);
- **prefill**: rows waiting to join (new prompts, continuations, or every row after ``invalidate()``) are fed their
  prompt + tokens so far, in one left-padded forward under a token budget (``prefill_tokens`` padded tokens per
  step, at least one row), so a burst of long prompts cannot stall the running rows for more than one such
  forward. Rows with the same prompt + prefix (a group's G samples) are prefilled once and their keys/values
  copied, as a prefix cache does.
The joining rows' keys/values are then appended to the running cache along the batch dimension (each side
left-padded with masked zeros to the longer length), and a finished or cancelled row's slot is dropped before the
next step, with the cache's all-padding leading columns trimmed. Positions are explicit per row, so the padding
never shifts a row's positions.

Weights may change between steps: without ``invalidate()`` the cache is kept (earlier positions keep the old
weights' keys/values; the recorded versions and log-probs are still exact for what was sampled), with it every
unfinished row is prefilled again under the new weights.

Routes: the routing of position j is computed when position j is first fed, so a response's tokens are *ready*
(``Row.ready``) once fed; its final token is ready when the row finishes. Rows are filled only through
``Row.extend``.

Caches whose layers are not plain ``DynamicLayer`` (sliding-window or hybrid attention, e.g. GPT-OSS) cannot be
merged this way: for those, joining rows make the whole batch re-prefill (correct, slower), and ``stats`` counts it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from engine.modeling.routing import route_dtype, route_hooks, route_shape
from engine.modeling.rows import Row


@dataclass
class DecodeStats:
    """What the batch did, for benches and tests: decode positions, prefilled positions (after prompt sharing),
    positions that prompt sharing saved, and full re-prefills of the batch (an unmergeable cache)."""

    decode_positions: int = 0
    prefill_positions: int = 0
    shared_positions: int = 0
    rebuilds: int = 0


@dataclass
class _Prefill:
    """One prefill forward of the distinct sequences of the joining rows."""

    logits_UV: torch.Tensor  # next-token logits of each distinct sequence
    cache: DynamicCache  # its keys/values, [U, ...]
    row_B: torch.Tensor  # joining row -> its distinct sequence
    mask_UL: torch.Tensor  # left-padding mask
    pos_U1: torch.Tensor  # the next position of each distinct sequence
    length: int  # L, the padded length


def _seq_key(r: Row) -> tuple:
    return tuple(r.prompt), tuple(r.tokens)


class DecodeBatch:
    def __init__(self, model, *, eos_id: int, pad_id: int, capture_routes: bool = False,
                 generator: torch.Generator | None = None, prefill_tokens: int = 4096) -> None:
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.capture_routes, self.generator = capture_routes, generator
        self.prefill_tokens = prefill_tokens
        self.rows: list[Row] = []  # every row not yet removed by the caller, finished ones included
        self.stats = DecodeStats()
        self._slots: list[Row] = []  # rows in the KV cache, in cache order (all positions but the newest fed)
        self._pending: list[Row] = []  # rows to prefill, in admission order
        self._gone: set[int] = set()  # slots of rows the caller removed before they finished
        self._cache: DynamicCache | None = None
        self._mask_BL = self._pos_B1 = None
        self._route_dtype = route_dtype(route_shape(model)[2]) if capture_routes else None

    def add(self, rows: list[Row]) -> None:
        self.rows.extend(rows)
        self._pending.extend(r for r in rows if not r.done)

    def remove(self, rows: list[Row]) -> None:
        gone = {id(r) for r in rows}
        self.rows = [r for r in self.rows if id(r) not in gone]
        self._pending = [r for r in self._pending if id(r) not in gone]
        self._gone |= {id(r) for r in self._slots if id(r) in gone}

    def invalidate(self) -> None:
        """Recompute the KV cache of every unfinished row before its next token (e.g. under new weights)."""
        self._pending = [r for r in self._slots if not r.done] + self._pending
        self._slots, self._cache, self._gone = [], None, set()

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
            self._drop_finished()
            old, joining = list(self._slots), self._admit()
            with route_hooks(self.model) if self.capture_routes else nullcontext() as calls:
                logits = [self._decode()] if old else []
                if joining:
                    pre = self._prefill(joining)
                    logits.append(pre.logits_UV[pre.row_B])
            routes = self._fed_routes(calls, old, joining, pre if joining else None) if self.capture_routes else None
            if joining:
                self._join(pre, joining)
            self._sample(torch.cat(logits), old + joining, version, routes)
        finally:
            self.model.train(was_training)

    # ---- the KV cache ----------------------------------------------------------------------------------------

    def _drop_finished(self) -> None:
        gone = self._gone
        keep = [i for i, r in enumerate(self._slots) if not r.done and id(r) not in gone]
        self._gone = set()
        if len(keep) == len(self._slots):
            return
        self._slots = [self._slots[i] for i in keep]
        if not keep:
            self._cache = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(idx)
        self._mask_BL, self._pos_B1 = self._mask_BL[idx], self._pos_B1[idx]
        first = int(self._mask_BL.any(0).nonzero()[0])  # leading columns that are padding in every row
        if first > 0:
            self._mask_BL = self._mask_BL[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]

    def _admit(self) -> list[Row]:
        """Waiting rows to prefill this step: in order, within the padded-token budget (at least one row)."""
        if self._pending and self._slots and not self._mergeable():
            self.stats.rebuilds += 1
            self.invalidate()  # this cache cannot take rows in: re-prefill every unfinished row together
            joining, self._pending = self._pending, []
            return joining
        seqs, longest, n = set(), 0, 0
        for r in self._pending:
            key, seq = _seq_key(r), len(r.prompt) + len(r.tokens)
            if n and (len(seqs) + (key not in seqs)) * max(longest, seq) > self.prefill_tokens:
                break
            seqs.add(key)
            longest, n = max(longest, seq), n + 1
        joining, self._pending = self._pending[:n], self._pending[n:]
        return joining

    def _mergeable(self) -> bool:
        return self._cache is None or all(type(layer) is DynamicLayer for layer in self._cache.layers)

    def _prefill(self, rows: list[Row]) -> _Prefill:
        """One left-padded forward of each distinct prompt + prefix (a group's samples share theirs)."""
        unique: dict[tuple, int] = {}
        row_B = torch.tensor([unique.setdefault(_seq_key(r), len(unique)) for r in rows])
        seqs = [list(p) + list(t) for p, t in unique]
        U, L = len(seqs), max(map(len, seqs))
        ids_UL = torch.full((U, L), self.pad_id, dtype=torch.long)
        mask_UL = torch.zeros((U, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids_UL[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask_UL[i, L - len(s):] = 1
        pos_UL = (mask_UL.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids_UL, attention_mask=mask_UL, position_ids=pos_UL, cache=cache,
                         use_cache=True, logits_to_keep=1)
        fed = sum(map(len, seqs))
        self.stats.prefill_positions += fed
        self.stats.shared_positions += sum(len(r.prompt) + len(r.tokens) for r in rows) - fed
        return _Prefill(out.logits[:, -1], cache, row_B, mask_UL, pos_UL[:, -1:] + 1, L)

    def _decode(self) -> torch.Tensor:
        tok_B1 = torch.tensor([[r.tokens[-1]] for r in self._slots], dtype=torch.long)
        self._mask_BL = torch.cat([self._mask_BL, torch.ones((len(self._slots), 1), dtype=torch.long)], dim=1)
        out = self.model(input_ids=tok_B1, attention_mask=self._mask_BL, position_ids=self._pos_B1,
                         cache=self._cache, use_cache=True)
        self._pos_B1 = self._pos_B1 + 1
        self.stats.decode_positions += len(self._slots)
        return out.logits[:, -1]

    def _join(self, pre: _Prefill, rows: list[Row]) -> None:
        """Append the joining rows' keys/values (one copy per row of its distinct sequence) to the cache."""
        new = pre.cache
        if not torch.equal(pre.row_B, torch.arange(len(pre.row_B))):  # some rows share a sequence
            new.batch_select_indices(pre.row_B)
        mask, pos = pre.mask_UL[pre.row_B], pre.pos_U1[pre.row_B]
        if self._cache is None:
            self._cache, self._mask_BL, self._pos_B1, self._slots = new, mask, pos, list(rows)
            return
        L = max(self._mask_BL.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, new.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, L, -2), _left_pad(theirs.keys, L, -2)])
            mine.values = torch.cat([_left_pad(mine.values, L, -2), _left_pad(theirs.values, L, -2)])
        self._mask_BL = torch.cat([_left_pad(self._mask_BL, L, -1), _left_pad(mask, L, -1)])
        self._pos_B1 = torch.cat([self._pos_B1, pos])
        self._slots += rows

    # ---- routes and sampling ---------------------------------------------------------------------------------

    def _fed_routes(self, calls, old: list[Row], joining: list[Row], pre: _Prefill | None
                    ) -> list[tuple[np.ndarray, int]]:
        """Per row (old, then joining): the routes of the positions just fed and the position of the first."""
        layers, out, call = len(calls.calls), [], 0
        if old:
            dec = calls.stacked(0).numpy().astype(self._route_dtype).reshape(len(old), layers, -1)
            out += [(dec[i:i + 1], len(r.prompt) + len(r.tokens) - 1) for i, r in enumerate(old)]
            call = 1
        if pre is not None:
            L = pre.length
            fed = calls.stacked(call).numpy().astype(self._route_dtype)
            fed = fed.reshape(-1, L, layers, fed.shape[-1])
            for r, u in zip(joining, pre.row_B.tolist()):
                out.append((fed[u, L - len(r.prompt) - len(r.tokens):], 0))
        return out

    def _sample(self, logits_BV: torch.Tensor, rows: list[Row], version: int,
                routes: list[tuple[np.ndarray, int]] | None) -> None:
        temps_B = torch.tensor([r.temperature for r in rows], dtype=torch.float32)
        greedy_B = temps_B <= 0
        logp_BV = torch.log_softmax(logits_BV.float() / torch.where(greedy_B, 1.0, temps_B)[:, None], dim=-1)
        tok_B = torch.multinomial(logp_BV.exp(), 1, generator=self.generator).squeeze(1)
        tok_B = torch.where(greedy_B, logp_BV.argmax(-1), tok_B)
        logp_B = logp_BV.gather(1, tok_B[:, None]).squeeze(1)
        for i, (r, tok, lp) in enumerate(zip(rows, tok_B.tolist(), logp_B.tolist())):
            fed, first_pos = routes[i] if routes is not None else (None, 0)
            r.extend([tok], [lp], version, routes=fed, routes_from=first_pos,
                     finish="stop" if tok == self.eos_id else None)


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros at the start of ``dim`` to ``length``."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
