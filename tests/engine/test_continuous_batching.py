"""Continuous batching (engine/modeling/decode.py): a joining response costs only its own prefill, a group's prompt
is prefilled once for its G samples, a finished or cancelled row frees its slot at once, the prefill budget keeps
running rows decoding, and none of it changes what a row generates."""

import pytest
import torch

from configs.schema import ModelConfig
from engine.data.tasks import CharTokenizer
from engine.modeling.decode import DecodeBatch
from engine.modeling.model import build_model
from engine.modeling.rows import Row

pytestmark = pytest.mark.timeout(60)
TOK = CharTokenizer()
PROMPTS = [TOK.encode(s) for s in ("12+7=", "3+45=", "600+1=", "9+9=", "1234+5678=")]


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(num_layers=2, num_experts=8, top_k=2), TOK.vocab_size, seed=0).eval()


def _greedy_alone(model, prompt, n):
    b = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id)
    row = Row(key=0, prompt=prompt, max_new_tokens=n, temperature=0.0)
    b.add([row])
    while b.active:
        b.step(0)
    return row.tokens, row.logprobs


def test_a_joining_group_costs_only_its_own_prompt_once(model):
    b = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id, generator=torch.Generator().manual_seed(0))
    running = [Row(key=i, prompt=p, max_new_tokens=20, temperature=1.0) for i, p in enumerate(PROMPTS[:3])]
    b.add(running)
    for _ in range(3):
        b.step(0)
    before = (b.stats.prefill_positions, b.stats.decode_positions, b.stats.shared_positions)
    group = [Row(key=("g", i), prompt=PROMPTS[4], max_new_tokens=20, temperature=1.0) for i in range(4)]
    b.add(group)
    b.step(0)
    assert b.stats.prefill_positions - before[0] == len(PROMPTS[4])  # no running row is fed again
    assert b.stats.decode_positions - before[1] == 3  # the three running rows, one position each
    assert b.stats.shared_positions - before[2] == 3 * len(PROMPTS[4])
    for _ in range(15):
        b.step(0)
    assert len({tuple(r.tokens) for r in group}) > 1  # shared keys/values, independent samples
    assert b.stats.rebuilds == 0


def test_finished_and_cancelled_rows_free_their_slots_at_once(model):
    b = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id)
    short = Row(key=0, prompt=PROMPTS[0], max_new_tokens=2, temperature=0.0)
    cancelled = Row(key=1, prompt=PROMPTS[1], max_new_tokens=30, temperature=0.0)
    long = Row(key=2, prompt=PROMPTS[2], max_new_tokens=12, temperature=0.0)
    b.add([short, cancelled, long])
    b.step(0)  # prefill: one token each
    b.step(0)  # decode 3: short is done
    b.remove([cancelled])
    decoded = b.stats.decode_positions
    b.step(0)
    assert b.stats.decode_positions - decoded == 1  # only `long` is fed
    while b.active:
        b.step(0)
    tokens, logprobs = _greedy_alone(model, PROMPTS[2], 12)
    assert long.tokens == tokens and long.logprobs == pytest.approx(logprobs, abs=1e-5)
    assert short.finish_reason == "length" and len(cancelled.tokens) == 2


def test_the_prefill_budget_keeps_running_rows_decoding(model):
    b = DecodeBatch(model, eos_id=-1, pad_id=TOK.pad_id, prefill_tokens=10)
    first = Row(key=0, prompt=PROMPTS[0], max_new_tokens=12, temperature=0.0)
    b.add([first])
    b.step(0)
    late = [Row(key=i, prompt=p, max_new_tokens=6, temperature=0.0) for i, p in enumerate(PROMPTS[1:4], 1)]
    b.add(late)
    b.step(0)
    assert len(first.tokens) == 2 and sum(bool(r.tokens) for r in late) == 1  # two prompts of 5-6 would exceed 10
    b.step(0)
    assert len(first.tokens) == 3 and sum(bool(r.tokens) for r in late) == 2
    while b.active:
        b.step(0)
    for r in [first, *late]:
        tokens, logprobs = _greedy_alone(model, r.prompt, r.max_new_tokens)
        assert r.tokens == tokens
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(logprobs), rtol=0, atol=1e-5)
