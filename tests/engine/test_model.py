import pytest
import torch

from configs.schema import ModelConfig, TaskConfig
from engine.modeling.model import build_model, evaluate_greedy, generate, load_weights, save_weights, token_logprobs
from engine.data.tasks import build_task

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=4,
                   top_k=2, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def task():
    return build_task(TaskConfig(num_eval=16, num_dev=8))


@pytest.fixture(scope="module")
def model(task):
    return build_model(TINY, task.tokenizer.vocab_size, seed=0)


def _right_pad(seqs, pad_id):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


@pytest.mark.timeout(30)
def test_generate_shapes_and_length_limit(model, task):
    prompts = [task.prompt_ids(ex) for ex in task.eval_set]
    outs = generate(model, prompts, max_new_tokens=5, temperature=1.0, eos_id=task.tokenizer.eos_id,
                    pad_id=task.tokenizer.pad_id, generator=torch.Generator().manual_seed(0))
    assert len(outs) == len(prompts)
    for ids, logps, *_ in outs:
        assert 1 <= len(ids) == len(logps) <= 5
        assert all(lp <= 0.0 for lp in logps)
        assert task.tokenizer.eos_id not in ids[:-1]  # an untrained model may sample pad: a normal token


@pytest.mark.timeout(30)
def test_generate_stops_at_eos(task):
    m = build_model(TINY, task.tokenizer.vocab_size, seed=0)
    eos, pad = task.tokenizer.eos_id, task.tokenizer.pad_id
    m.lm_head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)  # logits = bias only
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.zero_()
        m.lm_head.bias[eos] = 3.0
    prompts = [task.prompt_ids(ex) for ex in task.eval_set]
    greedy = generate(m, prompts, max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=pad)
    assert [g.token_ids for g in greedy] == [[eos]] * len(prompts)
    sampled = generate(m, prompts * 4, max_new_tokens=50, temperature=1.0, eos_id=eos, pad_id=pad,
                       generator=torch.Generator().manual_seed(0))
    lengths = [len(g.token_ids) for g in sampled]
    assert all(g.token_ids[-1] == eos and eos not in g.token_ids[:-1] for g in sampled)  # p(eos) ~ 0.17 per step
    assert len(set(lengths)) > 1 and max(lengths) < 50


@pytest.mark.timeout(30)
def test_greedy_is_deterministic_and_batch_independent(model, task):
    prompts = [task.prompt_ids(ex) for ex in task.eval_set]
    kw = dict(max_new_tokens=6, temperature=0.0, eos_id=task.tokenizer.eos_id, pad_id=task.tokenizer.pad_id)
    a, b = generate(model, prompts, **kw), generate(model, prompts, **kw)
    assert [x[0] for x in a] == [x[0] for x in b]
    alone = generate(model, prompts[3:4], **kw)  # different padding, same answer
    assert alone[0][0] == a[3][0]
    torch.testing.assert_close(torch.tensor(alone[0][1]), torch.tensor(a[3][1]), rtol=0, atol=1e-4)
    assert 0.0 <= evaluate_greedy(model, task, task.eval_set, batch_size=5) <= 1.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_behaviour_logprobs(model, task, temperature):
    prompts = [task.prompt_ids(ex) for ex in task.eval_set]
    outs = generate(model, prompts, max_new_tokens=6, temperature=temperature, eos_id=task.tokenizer.eos_id,
                    pad_id=task.tokenizer.pad_id, generator=torch.Generator().manual_seed(1))
    ids, mask = _right_pad([p + o.token_ids for p, o in zip(prompts, outs)], task.tokenizer.pad_id)
    logp = token_logprobs(model, ids, mask, temperature=temperature)
    assert logp.shape == ids.shape and bool((logp[:, 0] == 0).all())
    for i, (p, (gen, behaviour, *_)) in enumerate(zip(prompts, outs)):
        torch.testing.assert_close(logp[i, len(p): len(p) + len(gen)], torch.tensor(behaviour),
                                   rtol=0, atol=1e-4)
    logp[mask.bool()].sum().backward()  # differentiable
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.timeout(30)
def test_save_load_weights_round_trip(task, tmp_path):
    a = build_model(TINY, task.tokenizer.vocab_size, seed=0)
    b = build_model(TINY, task.tokenizer.vocab_size, seed=1)
    path = tmp_path / "w" / "weights.safetensors"
    save_weights(a, path)
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]  # no temp file left
    load_weights(b, path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    other = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                                    num_experts=4, top_k=2, moe_intermediate_size=32),
                        task.tokenizer.vocab_size, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        load_weights(other, path)
