"""Top-K forward KL(teacher || student), with logits computed from hidden states in chunks.

The teacher sends, per position, its top-K token ids and log-probs. Two ways to compare:

- ``tail`` (default): K + 1 buckets. Teacher: its K log-probs plus the tail
  ``log(1 - sum exp(top-K))``. Student: its log-softmax gathered at the teacher's ids plus
  its own tail, ``logsumexp`` of the logits outside those ids minus ``logsumexp`` of all
  (exact, unlike ``log(1 - sum q)``, which cancels catastrophically when the student's tail
  is tiny). With K = V this is the exact full-vocabulary KL.
- ``renorm``: both distributions renormalised over the teacher's K ids.

Temperature tempers both bucket distributions (``log_softmax(buckets / tau)``) and the
result is multiplied by tau^2 (Hinton et al.) so gradient sizes stay comparable across
temperatures. With K = V this is the exact tempered KL; with K < V the tail is tempered as
one bucket, since how its mass spreads over tokens is unknown.

Logits come from the final hidden states of the counted positions only, through the LM head,
``chunk_size`` positions at a time under non-reentrant activation checkpointing: forward and
backward each hold a few ``[chunk_size, V]`` float32 buffers, never ``[T, V]``.
The teacher's top-K ids at a position must be distinct.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("tail", "renorm")
# log of the smallest normal float32: the floor for log-probs of empty buckets (-87.3).
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


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

    hidden: float [B, T, H] final hidden states (after the final norm); lm_head: the LM head
    module (called on [C, H] chunks) or its weight [V, H]; teacher_ids: int [B, T, K];
    teacher_logprobs: float [B, T, K] (any float dtype; log-softmax over the full vocabulary);
    mask: bool [B, T], True where the position counts (assistant tokens); num_tokens: the
    count to normalise by (e.g. masked tokens over a whole accumulation window).
    Returns a float32 scalar, connected to `hidden` even when no position is masked.
    """
    _check_args(hidden, teacher_ids, teacher_logprobs, mask, temperature, mode, chunk_size)
    rows = mask.reshape(-1).bool()
    h = hidden.reshape(-1, hidden.shape[-1])[rows]  # [M, H]
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1])[rows].long()  # [M, K]
    lp = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])[rows].float()  # [M, K]
    project = lm_head if isinstance(lm_head, nn.Module) else functools.partial(F.linear, weight=lm_head)
    chunk_kl = functools.partial(_chunk_kl, project=project, temperature=temperature, mode=mode)
    total = h[:0].float().sum()
    for start in range(0, h.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_kl, h[part], ids[part], lp[part], use_reentrant=False)
    return total / num_tokens


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


def _chunk_kl(
    h: torch.Tensor,
    ids: torch.Tensor,
    lp: torch.Tensor,
    *,
    project: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    mode: str,
) -> torch.Tensor:
    """Summed KL of C positions. h: [C, H]; ids: int64 [C, K]; lp: float32 [C, K] -> float32 []."""
    logits = project(h).float()  # [C, V]; in the head's dtype, then float32 (as transformers does)
    picked = logits.gather(1, ids)  # [C, K]
    lp = lp.clamp_min(_LOG_TINY)  # float16 on the wire turns log-probs below -65504 into -inf
    if mode == "renorm":
        teacher, student = lp, picked
    else:
        logz = torch.logsumexp(logits, dim=1, keepdim=True)  # [C, 1]
        teacher = torch.cat([lp, _teacher_tail(lp)], dim=1)
        student = torch.cat([picked - logz, _student_tail(logits, ids, logz)], dim=1)
    teacher = torch.log_softmax(teacher / temperature, dim=1)
    student = torch.log_softmax(student / temperature, dim=1)
    kl = (teacher.exp() * (teacher - student)).sum(1).clamp_min(0)  # float rounding may dip below 0
    return kl.sum() * temperature**2


def _teacher_tail(lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(lp)): lp float32 [C, K] -> [C, 1], floored at log(tiny).

    A tail mass below K float32 epsilons is rounding noise of the sum (it is what K = V
    leaves), and tempering would inflate it, so it counts as empty. A top-K mass that rounds
    to 1 or above also gives the floor; the caller's log_softmax then renormalises the buckets.
    """
    tail = -torch.expm1(torch.logsumexp(lp, dim=1, keepdim=True))
    noise = lp.shape[1] * torch.finfo(torch.float32).eps
    return torch.log(torch.where(tail < noise, 0.0, tail).clamp_min(math.exp(_LOG_TINY)))


def _student_tail(logits: torch.Tensor, ids: torch.Tensor, logz: torch.Tensor) -> torch.Tensor:
    """Student log-mass outside `ids`, floored at log(tiny). logits float32 [C, V]; logz [C, 1] -> [C, 1].

    The picked ids are filled with float32's lowest finite value rather than -inf so that an
    empty tail (K = V) has a finite gradient, which the floor then zeroes.
    """
    rest = logits.scatter(1, ids, torch.finfo(logits.dtype).min)
    return (torch.logsumexp(rest, dim=1, keepdim=True) - logz).clamp_min(_LOG_TINY)
