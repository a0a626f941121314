"""Pre-flight checks of the whole HyperLoRA chain on the tiny Qwen3-Next student (real vocabulary).

Runs under pytest, or as `python tests/test_gradient_flow.py`, which prints one line per
checked property and then the measured forward+backward cost of HyperLoRA relative to the
student alone.

Gradient bounds: with the loss normalised per counted token, every parameter group's gradient
norm must be finite and within [GRAD_MIN, GRAD_MAX] once the first optimizer step has moved the
zero-initialised B-code layers (at step 0 only they receive gradient, by design).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from hyperdistill.trainer.hypernetwork import HyperLoRA, HyperLoRAConfig, build_hyper_lora
from hyperdistill.trainer.lora import hyper_lora
from hyperdistill.trainer.loss import topk_kl_loss
from tests.devtools.tiny_models import ensure_tiny_models

GRAD_MIN, GRAD_MAX = 1e-4, 10.0
BATCH, SEQ_LEN, PROMPT_LEN, TOP_K = 2, 24, 16, 8
LEARN_STEPS, LEARN_LR = 6, 1e-3
CONFIG = dict(
    rank=4,
    alpha=8.0,
    encoder_dim=64,
    encoder_heads=4,
    encoder_layers=1,
    trunk_dim=64,
    trunk_layers=1,
    max_prompt_tokens=64,
)


@dataclass
class Setup:
    """The tiny student (targets wrapped), a fixed batch and a fixed random top-K teacher."""

    student: torch.nn.Module
    input_ids: torch.Tensor  # int64 [B, T]
    attention_mask: torch.Tensor  # int64 [B, T]
    prompt_ids: torch.Tensor  # int64 [B, P]
    prompt_mask: torch.Tensor  # bool [B, P]
    teacher_ids: torch.Tensor  # int64 [B, T, K]
    teacher_logprobs: torch.Tensor  # float32 [B, T, K]
    loss_mask: torch.Tensor  # bool [B, T]

    def hyper(self, seed: int = 0) -> HyperLoRA:
        """A freshly initialised hypernetwork for the student."""
        torch.manual_seed(seed)
        return build_hyper_lora(HyperLoRAConfig(**CONFIG), self.student)

    def loss(self, hyper: HyperLoRA) -> torch.Tensor:
        """Generate the LoRA, run the student under it and return the top-K KL per counted token."""
        lora = hyper(self.prompt_ids, self.prompt_mask)
        with hyper_lora(self.student, lora, seq_len=self.input_ids.shape[1]):
            hidden = self.student.model(
                self.input_ids, attention_mask=self.attention_mask, use_cache=False
            ).last_hidden_state
        return topk_kl_loss(
            hidden,
            self.student.lm_head,
            self.teacher_ids,
            self.teacher_logprobs,
            self.loss_mask,
            int(self.loss_mask.sum()),
        )


def make_setup(seq_len: int = SEQ_LEN) -> Setup:
    """Load the tiny student and draw the fixed batch and teacher (seeded)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(ensure_tiny_models().student, dtype=torch.float32)
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    attention_mask = torch.ones(BATCH, seq_len, dtype=torch.long)
    attention_mask[1, -seq_len // 4 :] = 0  # right padding on the second row
    prompt_mask = torch.ones(BATCH, PROMPT_LEN, dtype=torch.bool)
    prompt_mask[1, PROMPT_LEN // 2 :] = False
    loss_mask = attention_mask.bool().clone()
    loss_mask[:, : seq_len // 3] = False  # the "user" part does not count
    # Teacher: random top-K ids, log-probs that leave 10 % of the mass to the tail.
    logits = 2 * torch.randn(BATCH, seq_len, TOP_K, generator=gen)
    logprobs = torch.log_softmax(logits, -1) + torch.log(torch.tensor(0.9))
    return Setup(
        student=student,
        input_ids=torch.randint(0, vocab, (BATCH, seq_len), generator=gen),
        attention_mask=attention_mask,
        prompt_ids=torch.randint(0, vocab, (BATCH, PROMPT_LEN), generator=gen),
        prompt_mask=prompt_mask,
        teacher_ids=torch.randint(0, vocab, (BATCH, seq_len, TOP_K), generator=gen),
        teacher_logprobs=logprobs,
        loss_mask=loss_mask,
    )


def group_grad_norms(hyper: HyperLoRA) -> dict[str, float]:
    """Gradient L2 norm of every parameter group (missing grads count as 0)."""
    return {
        group: float(sum(p.grad.pow(2).sum() for p in params if p.grad is not None) ** 0.5)
        for group, params in hyper.parameter_groups().items()
    }


def check_zero_init_preserves_student(s: Setup) -> str:
    hyper = s.hyper()
    with torch.no_grad():
        base = s.student(s.input_ids, attention_mask=s.attention_mask).logits
        lora = hyper(s.prompt_ids, s.prompt_mask)
        assert all(bool((w.B == 0).all()) for w in lora.weights.values()), "generated B is not zero at step 0"
        with hyper_lora(s.student, lora, seq_len=s.input_ids.shape[1]):
            adapted = s.student(s.input_ids, attention_mask=s.attention_mask).logits
    diff = (adapted - base).abs().max().item()
    assert torch.equal(adapted, base), f"logits changed at step 0 (max |diff| {diff:.3g})"
    return f"zero-init: B == 0 and float32 logits [{', '.join(map(str, base.shape))}] unchanged (tolerance 0, exact)"


def check_step0_gradients(s: Setup) -> str:
    hyper = s.hyper()
    s.loss(hyper).backward()
    bank_b = set(hyper.bank.B.values())
    for name, p in hyper.named_parameters():
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert got == (p in bank_b), f"step 0: {name} {'has' if got else 'lacks'} gradient"
    return f"step 0: exactly the {len(bank_b)} bank B tensors get gradient (B = 0 blocks the rest, as in LoRA)"


def _grads_after_steps(s: Setup, steps: int = 2) -> HyperLoRA:
    """A hypernetwork after `steps` AdamW steps, holding the gradients of the next one."""
    hyper = s.hyper()
    optimizer = torch.optim.AdamW(hyper.parameters(), lr=LEARN_LR)
    for _ in range(steps):
        s.loss(hyper).backward()
        optimizer.step()
        optimizer.zero_grad()
    s.loss(hyper).backward()
    return hyper


def _without_gradient(hyper: HyperLoRA) -> list[str]:
    return [name for name, p in hyper.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


def check_all_groups_after_two_steps(s: Setup) -> str:
    # Step 1 moves B off zero, which opens the heads (zero-initialised: gates = 1); step 2 moves the
    # heads off zero, which opens the trunk and the encoder.
    after_one = _without_gradient(_grads_after_steps(s, 1))
    assert after_one and all(n.startswith(("encoder.", "generator.")) and ".heads." not in n for n in after_one)
    hyper = _grads_after_steps(s, 2)
    assert not _without_gradient(hyper), f"after two steps these parameters get no gradient: {_without_gradient(hyper)}"
    norms = group_grad_norms(hyper)
    return (
        f"after 1 step: bank and heads get gradient; after 2: every parameter of all {len(norms)} groups "
        f"({', '.join(norms)})"
    )


def check_gradient_bounds(s: Setup) -> str:
    hyper = _grads_after_steps(s)
    norms = group_grad_norms(hyper)
    for group, norm in norms.items():
        assert GRAD_MIN <= norm <= GRAD_MAX, f"{group}: gradient norm {norm:.3g} outside [{GRAD_MIN}, {GRAD_MAX}]"
    low, high = min(norms, key=norms.get), max(norms, key=norms.get)
    return (
        f"gradient norms finite, in [{GRAD_MIN:g}, {GRAD_MAX:g}]: "
        f"min {norms[low]:.2e} ({low}), max {norms[high]:.2e} ({high})"
    )


def check_student_frozen(s: Setup) -> str:
    hyper = s.hyper()
    s.loss(hyper).backward()
    trainable = [n for n, p in s.student.named_parameters() if p.requires_grad]
    with_grad = [n for n, p in s.student.named_parameters() if p.grad is not None]
    assert not trainable and not with_grad, f"student parameters trainable {trainable} / with grad {with_grad}"
    count = sum(1 for _ in s.student.parameters())
    return f"student frozen: none of its {count} parameter tensors requires or receives gradient"


def check_learns(s: Setup) -> str:
    hyper = s.hyper()
    optimizer = torch.optim.AdamW(hyper.parameters(), lr=LEARN_LR)
    losses = []
    for _ in range(LEARN_STEPS):
        loss = s.loss(hyper)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(s.loss(hyper).item())
    assert losses[-1] < 0.99 * losses[0], f"KL did not go down: {losses}"
    return (
        f"learns: KL {losses[0]:.4f} -> {losses[-1]:.4f} after {LEARN_STEPS} AdamW steps "
        f"(lr {LEARN_LR:g}) on one fixed batch"
    )


CHECKS = (
    check_zero_init_preserves_student,
    check_step0_gradients,
    check_all_groups_after_two_steps,
    check_gradient_bounds,
    check_student_frozen,
    check_learns,
)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return make_setup()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_preflight(setup: Setup, check) -> None:
    check(setup)


def _interleaved_medians(first, second, repeats: int) -> tuple[float, float, float]:
    """Median seconds of `first` and `second`, timed alternately (the CPU is shared, so load
    drifts), and the median of the per-pair ratios second / first."""
    first(), second()  # warm-up
    pairs = []
    for _ in range(repeats):
        times = []
        for fn in (first, second):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        pairs.append(times)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return median([a for a, _ in pairs]), median([b for _, b in pairs]), median([b / a for a, b in pairs])


def measure_cost(seq_len: int, repeats: int) -> list[str]:
    """Median forward+backward time with HyperLoRA vs the student alone, with the top-K KL
    (152K-vocabulary LM head) as the loss and with the backbone alone (loss = mean hidden^2).
    The student-only run backpropagates to its input embeddings, as any adapter training must."""
    s = make_setup(seq_len)
    hyper = s.hyper()
    embeds = s.student.get_input_embeddings()(s.input_ids).detach().requires_grad_()
    kl = functools.partial(
        topk_kl_loss,
        lm_head=s.student.lm_head,
        teacher_ids=s.teacher_ids,
        teacher_logprobs=s.teacher_logprobs,
        mask=s.loss_mask,
        num_tokens=int(s.loss_mask.sum()),
    )
    backbone = s.student.model

    def student_only(loss_fn) -> None:
        hidden = backbone(inputs_embeds=embeds, attention_mask=s.attention_mask, use_cache=False).last_hidden_state
        loss_fn(hidden).backward()

    def with_hyper_lora(loss_fn) -> None:
        lora = hyper(s.prompt_ids, s.prompt_mask)
        with hyper_lora(s.student, lora, seq_len=seq_len):
            hidden = backbone(s.input_ids, attention_mask=s.attention_mask, use_cache=False).last_hidden_state
        loss_fn(hidden).backward()
        hyper.zero_grad()

    lines = []
    for label, loss_fn in (("top-K KL", kl), ("backbone only", lambda h: h.pow(2).mean())):
        base, adapted, ratio = _interleaved_medians(
            lambda loss_fn=loss_fn: student_only(loss_fn), lambda loss_fn=loss_fn: with_hyper_lora(loss_fn), repeats
        )
        lines.append(
            f"cost ({label}): HyperLoRA fwd+bwd {adapted * 1e3:.0f} ms vs student fwd+bwd "
            f"{base * 1e3:.0f} ms, median ratio {ratio:.2f}x"
        )
    lines.append(
        f"cost measured at B={BATCH}, T={seq_len}, {repeats} interleaved pairs, {torch.get_num_threads()} threads"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost-seq-len", type=int, default=128, help="sequence length of the cost measurement")
    parser.add_argument("--cost-repeats", type=int, default=7, help="timed pairs of runs (medians reported)")
    args = parser.parse_args()
    setup = make_setup()
    failed = 0
    for check in CHECKS:
        try:
            print(f"ok    {check(setup)}", flush=True)
        except AssertionError as e:
            failed += 1
            print(f"FAIL  {check.__name__.removeprefix('check_')}: {e}", flush=True)
    for line in measure_cost(args.cost_seq_len, args.cost_repeats):
        print(f"info  {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
