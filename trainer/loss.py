"""Top-K forward KL(teacher || student), with logits computed from hidden states in chunks.

The teacher sends, per position, its top-K token ids and log-probs. Two ways to compare:

- ``tail`` (default): K + 1 buckets. Teacher: its K log-probs plus the tail
  ``log(1 - sum exp(top-K))``. Student: its log-softmax gathered at the teacher's ids plus
  its own tail, the log of the summed probability outside those ids (summed directly, so it
  is exact, unlike ``log(1 - sum q)``, which cancels catastrophically when the student's tail
  is tiny). With K = V this is the exact full-vocabulary KL.
- ``renorm``: both distributions renormalised over the teacher's K ids. Only the K logits at
  the teacher's ids are computed (rows of the LM head gathered), never a [C, V] buffer.

Temperature tempers both bucket distributions (``log_softmax(buckets / tau)``) and the
result is multiplied by tau^2 (Hinton et al.) so gradient sizes stay comparable across
temperatures. With K = V this is the exact tempered KL; with K < V the tail is tempered as
one bucket, since how its mass spreads over tokens is unknown.

Memory: logits come from the final hidden states of the counted positions only, through the
LM head, ``chunk_size`` positions at a time, and the gradient with respect to the hidden
states (and the head's weight, if it is trainable) is computed in the same pass from the
closed form below, while the chunk's logits are at hand. One ``[chunk_size, V]`` float32
buffer is live at a time (logits, then their exponentials, then the gradient, in place);
backward only scales the saved ``[M, H]`` gradient. Under ``torch.no_grad()`` no gradient is
computed. The teacher's top-K ids at a position must be distinct.

Gradient (tail mode). With l the logits, logz = logsumexp(l), s the student's K + 1 bucket
log-probs (s_k = l[id_k] - logz, s_tail = log(sum of exp(l) outside the ids) - logz), and
S', T' the tempered bucket log-probs, d(loss)/ds = tau * (exp(S') - exp(T')) =: g, whose
entries sum to 0. Hence d(loss)/dl_j = g_k for j = id_k and g_tail * exp(l_j) / (tail sum)
elsewhere. When the student's tail is floored at log(tiny) it passes no gradient, the logz
terms no longer cancel, and g_tail * softmax(l)_j is added to every entry instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MODES = ("tail", "renorm")
# log of the smallest normal float32: the floor for log-probs of empty buckets (-87.3).
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
_TINY = torch.finfo(torch.float32).tiny


def topk_kl_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: int | torch.Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "tail",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Sum of per-position KL over the masked positions, divided by `num_tokens`.

    hidden: float [B, T, H] final hidden states (after the final norm); lm_head: a bias-free
    linear LM head (module with ``weight``) or its weight [V, H]; teacher_ids: int [B, T, K];
    teacher_logprobs: float [B, T, K] (any float dtype; log-softmax over the full vocabulary);
    mask: bool [B, T], True where the position counts (assistant tokens); num_tokens: the
    count to normalise by (e.g. masked tokens over a whole accumulation window).
    Returns a float32 scalar, connected to `hidden` even when no position is masked.
    """
    _check_args(hidden, teacher_ids, teacher_logprobs, mask, temperature, mode, chunk_size)
    weight = _head_weight(lm_head)
    rows = mask.reshape(-1).bool()
    h = hidden.reshape(-1, hidden.shape[-1])[rows]  # [M, H]
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])[rows].long()  # [M, K]
    # float16 on the wire turns log-probs below -65504 into -inf: hence the floor.
    lp = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])[rows].float().clamp_min(_LOG_TINY)  # [M, K]
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _ChunkedTopKKL.apply(h, weight, ids, lp, temperature, mode, chunk_size)
    else:
        total = sum(
            (
                _chunk_kl(h[part], weight, ids[part], lp[part], temperature, mode)
                for part in _chunks(h.shape[0], chunk_size)
            ),
            h.new_zeros((), dtype=torch.float32),
        )
    return total / num_tokens


@torch.no_grad()
def topk_kl_per_position(
    hidden: torch.Tensor,
    lm_head: nn.Module | torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    mode: str = "tail",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """The KL of each position, without gradient: the summands of `topk_kl_loss`.

    hidden: float [M, H] final hidden states of the positions to score; teacher_ids: int [M, K];
    teacher_logprobs: float [M, K]. Returns float32 [M]. Logits are computed ``chunk_size``
    positions at a time, as in `topk_kl_loss`.
    """
    _check_args(
        hidden[None],
        teacher_ids[None],
        teacher_logprobs[None],
        hidden.new_ones(1, hidden.shape[0]),
        temperature,
        mode,
        chunk_size,
    )
    weight = _head_weight(lm_head)
    lp = teacher_logprobs.float().clamp_min(_LOG_TINY)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for part in _chunks(hidden.shape[0], chunk_size):
        _chunk_kl(hidden[part], weight, teacher_ids[part].long(), lp[part], temperature, mode, per_position=out[part])
    return out


class _ChunkedTopKKL(torch.autograd.Function):
    """Summed KL of M positions; both gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, ids, lp, temperature: float, mode: str, chunk_size: int):
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for part in _chunks(h.shape[0], chunk_size):
            total += _chunk_kl(
                h[part],
                weight,
                ids[part],
                lp[part],
                temperature,
                mode,
                None if grad_h is None else grad_h[part],
                grad_w,
            )
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _chunk_kl(
    h: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    temperature: float,
    mode: str,
    grad_h: torch.Tensor | None = None,
    grad_w: torch.Tensor | None = None,
    per_position: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed KL of C positions; writes dKL/dh into `grad_h` and adds dKL/dweight to `grad_w` if given,
    and each position's KL into `per_position` if given.

    h: [C, H]; weight: [V, H] (h's dtype); ids: int64 [C, K]; lp: float32 [C, K], floored at
    log(tiny); grad_h: [C, H] (h's dtype); grad_w: float32 [V, H]; per_position: float32 [C].
    Returns float32 [].
    """
    if mode == "renorm":
        rows = weight[ids]  # [C, K, H]
        student = torch.einsum("ckh,ch->ck", rows, h).float()  # the K logits only
        teacher = lp
    else:
        buf = (h @ weight.T).float()  # [C, V]: logits in the head's dtype, then float32 (as transformers does)
        picked = buf.gather(1, ids)  # [C, K]
        top = buf.amax(1, keepdim=True)
        z = buf.sub_(top).exp_().sum(1, keepdim=True)  # buf = exp(l - top); z = sum of it
        logz = z.log() + top
        tail_sum = buf.scatter_(1, ids, 0.0).sum(1, keepdim=True)  # buf = exp(l - top) outside the ids
        student_tail = tail_sum.log() + top - logz
        live = student_tail > _LOG_TINY  # a floored tail passes no gradient
        student = torch.cat([picked - logz, student_tail.clamp_min(_LOG_TINY)], dim=1)
        teacher = torch.cat([lp, _teacher_tail(lp)], dim=1)
    teacher = torch.log_softmax(teacher / temperature, dim=1)
    student = torch.log_softmax(student / temperature, dim=1)
    kl = (teacher.exp() * (teacher - student)).sum(1, keepdim=True)
    total = kl.clamp_min(0).sum() * temperature**2  # float rounding may dip below 0: clamped, no gradient
    if per_position is not None:
        per_position.copy_(kl[:, 0].clamp_min(0) * temperature**2)
    if grad_h is None and grad_w is None:
        return total
    g = (student.exp() - teacher.exp()) * (temperature * (kl >= 0))  # dKL/d(buckets) [C, K(+1)]
    if mode == "renorm":
        if grad_h is not None:
            grad_h.copy_(torch.einsum("ck,ckh->ch", g.to(rows.dtype), rows))
        if grad_w is not None:
            grad_w.index_add_(0, ids.reshape(-1), (g[..., None] * h.float()[:, None, :]).reshape(-1, h.shape[1]))
        return total
    g_top, g_tail = g[:, :-1], g[:, -1:]
    buf.mul_(torch.where(live, g_tail / tail_sum.clamp_min(_TINY), g_tail / z))  # buf = dKL/dl outside the ids
    buf.scatter_(1, ids, g_top + torch.where(live, 0.0, g_tail * (picked - logz).exp()))  # buf = dKL/dl
    if grad_h is not None:
        grad_h.copy_(buf.to(weight.dtype) @ weight)
    if grad_w is not None:
        grad_w.addmm_(buf.T, h.float())
    return total


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


def _head_weight(lm_head: nn.Module | torch.Tensor) -> torch.Tensor:
    if isinstance(lm_head, torch.Tensor):
        return lm_head
    weight, bias = getattr(lm_head, "weight", None), getattr(lm_head, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or bias is not None:
        raise ValueError(
            f"topk_kl_loss: lm_head must be a bias-free linear layer or its [V, H] weight, got {type(lm_head).__name__}"
        )
    return weight


def _check_args(hidden, teacher_ids, teacher_logprobs, mask, temperature, mode, chunk_size) -> None:
    if mode not in MODES:
        raise ValueError(f"topk_kl_loss: mode must be one of {MODES}, got {mode!r}")
    if not temperature > 0 or chunk_size < 1:
        raise ValueError(f"topk_kl_loss: need temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"topk_kl_loss: hidden {list(hidden.shape)} is not [B, T, H] for mask {list(mask.shape)}")
    if teacher_ids.shape != teacher_logprobs.shape or tuple(teacher_ids.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"topk_kl_loss: teacher_ids {list(teacher_ids.shape)} and teacher_logprobs "
            f"{list(teacher_logprobs.shape)} must both be [B, T, K] with [B, T] = {list(mask.shape)}"
        )


def _teacher_tail(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(lp)): lp float32 [C, K] -> [C, 1], floored at log(tiny).

    A tail mass below K float32 epsilons is rounding noise of the sum (it is what K = V
    leaves), and tempering would inflate it, so it counts as empty. A top-K mass that rounds
    to 1 or above also gives the floor; the caller's log_softmax then renormalises the buckets.
    """
    tail = -torch.expm1(torch.logsumexp(lp, dim=1, keepdim=True))
    noise = lp.shape[1] * torch.finfo(torch.float32).eps
    return torch.log(torch.where(tail < noise, 0.0, tail).clamp_min(_TINY))
