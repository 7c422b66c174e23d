import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.algo.entropy import logprobs_and_entropy

pytestmark = pytest.mark.timeout(30)


def _direct(hidden_NLH, w_VH, targets_NL, temperature):
    logp_NLV = torch.log_softmax(hidden_NLH.double() @ w_VH.double().T / temperature, dim=-1)
    return (logp_NLV.gather(-1, targets_NL[..., None]).squeeze(-1),
            -(logp_NLV.exp() * logp_NLV).sum(-1))


@pytest.mark.parametrize("chunk", [1, 5, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_a_direct_full_vocabulary_computation(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    hidden_NLH = torch.randn(3, 7, 16, generator=g)
    w_VH = torch.randn(50, 16, generator=g)
    targets_NL = torch.randint(0, 50, (3, 7), generator=g)
    logp_NL, ent_NL = logprobs_and_entropy(hidden_NLH, w_VH, targets_NL, temperature=temperature,
                                           chunk_tokens=chunk)
    ref_logp, ref_ent = _direct(hidden_NLH, w_VH, targets_NL, temperature)
    assert logp_NL.shape == ent_NL.shape == (3, 7) and logp_NL.dtype == torch.float32
    torch.testing.assert_close(logp_NL.double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent_NL.double(), ref_ent, rtol=1e-4, atol=1e-4)


def test_uniform_distribution_has_entropy_log_v_and_no_gradient_flows():
    hidden_NLH = torch.zeros(2, 3, 4, requires_grad=True)
    w_VH = torch.randn(11, 4, requires_grad=True)
    logp_NL, ent_NL = logprobs_and_entropy(hidden_NLH, w_VH, torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(ent_NL, torch.full((2, 3), torch.log(torch.tensor(11.0)).item()))
    torch.testing.assert_close(logp_NL, torch.full((2, 3), -torch.log(torch.tensor(11.0)).item()))
    assert not logp_NL.requires_grad and not ent_NL.requires_grad


def test_bfloat16_weights_give_float32_outputs():
    g = torch.Generator().manual_seed(1)
    hidden_NLH = torch.randn(2, 4, 8, generator=g)
    w_VH = torch.randn(30, 8, generator=g)
    targets_NL = torch.randint(0, 30, (2, 4), generator=g)
    logp_NL, ent_NL = logprobs_and_entropy(hidden_NLH.bfloat16(), w_VH.bfloat16(), targets_NL, chunk_tokens=3)
    ref_logp, ref_ent = _direct(hidden_NLH.bfloat16().float(), w_VH.bfloat16().float(), targets_NL, 1.0)
    assert logp_NL.dtype == ent_NL.dtype == torch.float32
    torch.testing.assert_close(ent_NL.double(), ref_ent, rtol=0.05, atol=0.05)
    torch.testing.assert_close(logp_NL.double(), ref_logp, rtol=0.05, atol=0.1)


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_large_vocabulary_never_materialises_more_than_one_chunk_of_logits():
    N, L, H, V, chunk = 4, 1024, 8, 50_000, 256
    g = torch.Generator().manual_seed(2)
    hidden_NLH = torch.randn(N, L, H, generator=g)
    w_VH = torch.randn(V, H, generator=g) * 0.5
    targets_NL = torch.randint(0, V, (N, L), generator=g)
    with _LargestOutput() as probe:
        logp_NL, ent_NL = logprobs_and_entropy(hidden_NLH, w_VH, targets_NL, chunk_tokens=chunk)
    assert probe.max_numel <= chunk * V  # a full [N, L, V] would be 16x larger
    assert probe.max_numel < N * L * V // 8
    ref_logp, ref_ent = _direct(hidden_NLH[:1, :40], w_VH, targets_NL[:1, :40], 1.0)
    torch.testing.assert_close(logp_NL[:1, :40].double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ent_NL[:1, :40].double(), ref_ent, rtol=1e-4, atol=1e-4)
    assert torch.all(ent_NL >= 0) and torch.all(ent_NL <= torch.log(torch.tensor(float(V))) + 1e-4)
