"""Top-K KL against naive full-vocabulary references (small V), chunking, masking, edge cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hyperdistill.trainer.loss import topk_kl_loss

V, H = 64, 16


def make_case(k: int, *, batch: int = 2, seq: int = 7, hidden_dim: int = H, seed: int = 0):
    """Random student (hidden [B, T, H], weight [V, H]), a peaked teacher's top-k, a mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, hidden_dim, generator=gen).requires_grad_()
    weight = torch.randn(V, hidden_dim, generator=gen) / hidden_dim**0.5 * 3
    teacher_logits = 3 * torch.randn(batch, seq, V, generator=gen)
    logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    mask[0, 0] = True
    return hidden, weight, teacher_logits, ids, logprobs, mask


def exact_kl(hidden, weight, teacher_logits, mask, num_tokens, temperature):
    """Full-vocabulary tempered KL(teacher || student) * tau^2, summed over mask / num_tokens."""
    t = torch.log_softmax(teacher_logits.double() / temperature, -1)
    s = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    return ((t.exp() * (t - s)).sum(-1) * mask).sum() / num_tokens * temperature**2


def naive_bucket_kl(hidden, weight, ids, logprobs, mask, num_tokens, temperature, mode):
    """The K+1-bucket (or renormalised top-K) KL from full [B, T, V] float64 probabilities."""
    log_q = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    t, s = logprobs.double(), log_q.gather(-1, ids)
    if mode == "tail":
        t = torch.cat([t, torch.log1p(-t.exp().sum(-1, keepdim=True))], -1)
        s = torch.cat([s, torch.log1p(-s.exp().sum(-1, keepdim=True))], -1)
    t, s = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    return ((t.exp() * (t - s)).sum(-1) * mask).sum() / num_tokens * temperature**2


def value_and_grad(loss, hidden):
    (grad,) = torch.autograd.grad(loss, hidden)
    return loss.detach().double(), grad.double()


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_k_equals_v_is_exact_kl(mode, temperature):
    hidden, weight, teacher_logits, ids, logprobs, mask = make_case(V)
    n = int(mask.sum())
    got = value_and_grad(
        topk_kl_loss(hidden, weight, ids, logprobs, mask, n, temperature=temperature, mode=mode, chunk_size=4), hidden
    )
    want = value_and_grad(exact_kl(hidden, weight, teacher_logits, mask, n, temperature), hidden)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_matches_naive_reference(mode, temperature):
    hidden, weight, _, ids, logprobs, mask = make_case(5, seed=1)
    got = value_and_grad(
        topk_kl_loss(hidden, weight, ids, logprobs, mask, 9, temperature=temperature, mode=mode, chunk_size=3), hidden
    )
    want = value_and_grad(naive_bucket_kl(hidden, weight, ids, logprobs, mask, 9, temperature, mode), hidden)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_tail_bucket_counts():
    """With K < V the tail bucket carries information: the two modes give different losses."""
    hidden, weight, _, ids, logprobs, mask = make_case(3, seed=2)
    tail = topk_kl_loss(hidden, weight, ids, logprobs, mask, 1)
    renorm = topk_kl_loss(hidden, weight, ids, logprobs, mask, 1, mode="renorm")
    assert not torch.allclose(tail, renorm)


def test_chunking_does_not_change_values_or_grads():
    hidden, weight, _, ids, logprobs, mask = make_case(6, seed=3)
    results = [
        value_and_grad(topk_kl_loss(hidden, weight, ids, logprobs, mask, 5, chunk_size=c), hidden)
        for c in (1, 4, 10_000)
    ]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)


def test_mask_and_normaliser():
    hidden, weight, _, ids, logprobs, mask = make_case(4, seed=4)
    ids = ids.masked_fill(~mask[..., None], V + 100)  # garbage where nothing counts: never gathered
    loss = topk_kl_loss(hidden, weight, ids, logprobs, mask, 3)
    rows = mask.nonzero(as_tuple=True)
    alone = topk_kl_loss(
        hidden[rows][None],
        weight,
        ids[rows][None],
        logprobs[rows][None],
        torch.ones(1, len(rows[0]), dtype=torch.bool),
        3,
    )
    torch.testing.assert_close(loss, alone)
    torch.testing.assert_close(topk_kl_loss(hidden, weight, ids, logprobs, mask, torch.tensor(6.0)), loss / 2)


def test_lm_head_module_or_weight():
    hidden, weight, _, ids, logprobs, mask = make_case(4, seed=5)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    torch.testing.assert_close(
        topk_kl_loss(hidden, head, ids, logprobs, mask, 1), topk_kl_loss(hidden, weight, ids, logprobs, mask, 1)
    )


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_never_negative(mode):
    for seed in range(10):
        hidden, weight, _, ids, logprobs, mask = make_case(1 + seed * 7, seed=seed)
        for temperature in (0.5, 1.0, 3.0):
            assert topk_kl_loss(hidden, weight, ids, logprobs, mask, 1, temperature=temperature, mode=mode) >= 0
    # Teacher = the student itself: KL is ~0 and must not dip below it.
    hidden, weight, *_ = make_case(1)
    logprobs, ids = torch.log_softmax(hidden @ weight.T, -1).detach().topk(10, dim=-1)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    for dtype in (torch.float32, torch.float16):
        loss = topk_kl_loss(hidden, weight, ids, logprobs.to(dtype), mask, 1, mode=mode)
        assert 0 <= loss < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_teacher_top_k_mass_rounding_to_one(mode):
    hidden, weight, _, ids, _, mask = make_case(8, seed=6)
    # Peaked rows whose top-K mass is exactly 1 or, after float16 rounding, above it.
    logprobs = torch.full(ids.shape, -40.0)
    logprobs[..., 0] = 0.0
    logprobs[1, :, :2] = torch.tensor([-0.6931, -0.6931]).half().float()  # 2 * 0.50002 > 1
    for dtype in (torch.float32, torch.float16):
        loss = topk_kl_loss(hidden, weight, ids, logprobs.to(dtype), mask, 1, mode=mode)
        (grad,) = torch.autograd.grad(loss, hidden)
        assert torch.isfinite(loss) and loss >= 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", ["tail", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_extreme_student_logits(mode, temperature):
    gen = torch.Generator().manual_seed(7)
    hidden = (1e4 * torch.randint(-1, 2, (2, 5, V), generator=gen).float()).requires_grad_()
    weight = torch.eye(V)  # logits = hidden: +-1e4 and 0
    _, _, _, ids, logprobs, _ = make_case(6, seq=5, seed=7)
    for k in (6, V):
        idx = ids if k == 6 else torch.arange(V).expand(2, 5, V)
        lp = logprobs if k == 6 else torch.log_softmax(torch.randn(2, 5, V, generator=gen), -1)
        loss = topk_kl_loss(
            hidden, weight, idx, lp, torch.ones(2, 5, dtype=torch.bool), 10, temperature=temperature, mode=mode
        )
        (grad,) = torch.autograd.grad(loss, hidden)
        assert torch.isfinite(loss) and loss >= 0 and torch.isfinite(grad).all()


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest numel of any op output whose last dimension is V."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk_size", [16, 10_000])
def test_peak_logits_bounded_by_chunk(chunk_size):
    """Forward holds at most [chunk_size, V] at once; backward touches nothing of vocabulary size."""
    hidden, weight, _, ids, logprobs, _ = make_case(5, batch=2, seq=48, hidden_dim=8)
    mask = torch.ones(2, 48, dtype=torch.bool)
    forward, backward = LargestVocabTensor(), LargestVocabTensor()
    with forward:
        loss = topk_kl_loss(hidden, weight, ids, logprobs, mask, 96, chunk_size=chunk_size)
    with backward:
        loss.backward()
    assert forward.largest == min(chunk_size, 96) * V and backward.largest == 0


def test_renorm_never_computes_vocabulary_logits():
    hidden, weight, _, ids, logprobs, mask = make_case(5, seed=9)
    seen = LargestVocabTensor()
    with seen:
        topk_kl_loss(hidden, weight, ids, logprobs, mask, 1, mode="renorm").backward()
    assert seen.largest == 0 and hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_trainable_head_gets_reference_gradient(mode):
    hidden, weight, _, ids, logprobs, mask = make_case(5, seed=10)
    weight.requires_grad_()
    loss = topk_kl_loss(hidden, weight, ids, logprobs, mask, 4, temperature=2.0, mode=mode, chunk_size=3)
    got = torch.autograd.grad(loss, [hidden, weight])
    want = torch.autograd.grad(naive_bucket_kl(hidden, weight, ids, logprobs, mask, 4, 2.0, mode), [hidden, weight])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


def test_no_grad_gives_the_same_value_and_no_graph():
    hidden, weight, _, ids, logprobs, mask = make_case(5, seed=11)
    with torch.no_grad():
        value = topk_kl_loss(hidden, weight, ids, logprobs, mask, 3, chunk_size=2)
    assert not value.requires_grad
    torch.testing.assert_close(value, topk_kl_loss(hidden, weight, ids, logprobs, mask, 3, chunk_size=2).detach())


def test_scales_with_the_upstream_gradient():
    hidden, weight, _, ids, logprobs, mask = make_case(5, seed=12)
    (once,) = torch.autograd.grad(topk_kl_loss(hidden, weight, ids, logprobs, mask, 1), hidden)
    (thrice,) = torch.autograd.grad(3 * topk_kl_loss(hidden, weight, ids, logprobs, mask, 1), hidden)
    torch.testing.assert_close(thrice, 3 * once)


def test_no_counted_positions_gives_connected_zero():
    hidden, weight, _, ids, logprobs, _ = make_case(4)
    loss = topk_kl_loss(hidden, weight, ids, logprobs, torch.zeros(2, 7, dtype=torch.bool), 1)
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None and not hidden.grad.any()


def test_bfloat16_inputs_give_float32_loss():
    hidden, weight, _, ids, logprobs, mask = make_case(4, seed=8)
    ref = topk_kl_loss(hidden, weight, ids, logprobs, mask, 1)
    low = topk_kl_loss(hidden.bfloat16(), weight.bfloat16(), ids.int(), logprobs.half(), mask, 1)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)


def test_bad_arguments():
    hidden, weight, _, ids, logprobs, mask = make_case(4)
    with pytest.raises(ValueError, match="mode"):
        topk_kl_loss(hidden, weight, ids, logprobs, mask, 1, mode="reverse")
    with pytest.raises(ValueError, match="temperature"):
        topk_kl_loss(hidden, weight, ids, logprobs, mask, 1, temperature=0)
    with pytest.raises(ValueError, match="teacher_ids"):
        topk_kl_loss(hidden, weight, ids[..., :2], logprobs, mask, 1)
    with pytest.raises(ValueError, match="hidden"):
        topk_kl_loss(hidden[0], weight, ids, logprobs, mask, 1)
    with pytest.raises(ValueError, match="bias-free"):
        topk_kl_loss(hidden, nn.Linear(H, V), ids, logprobs, mask, 1)
