"""The controlled task of ``make learn-bench``: instruction families whose teachers are known.

Family c's teacher is the student plus a fixed random rank-4 LoRA_c on every target module,
scaled so that KL(teacher_c || student) is ~0.5 nats per assistant token. A per-prompt
hypernetwork can reach the teacher exactly (it only has to tell the families apart from the
prompt and emit LoRA_c); one static LoRA can only fit the families' average.

Two variants of the prompts:

- ``instructions``: each family has its own task (explain, document, test, review code),
  phrased in several paraphrases that all contain the family's keyword as the same tokens
  (" explain", " docstring", " tests", " review"). The tiny student's embeddings, which the
  prompt encoder reads, are random: nothing in them relates "Audit" to "review", so a held-out
  paraphrase can only be recognised by tokens seen in training (with the real student's
  embeddings synonyms would carry; here they cannot);
- ``content-words``: all families share the same paraphrases of one instruction and differ
  in one content word (the target language of a port).

Paraphrases are split: the last ``HELD_OUT`` of each family are never trained on, and the
evaluation uses only them. Code snippets and responses are drawn from Python's standard
library sources (no download), so prompts differ in content as well as in instruction.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

INSTRUCTIONS = {
    "explain": [
        "Please explain what this code does.",
        "Could you explain the following snippet in plain words?",
        "I need you to explain this code step by step.",
        "Briefly explain the logic of the code below.",
        "Try to explain how this function behaves.",
        "Kindly explain what the snippet below computes.",
        "Can you explain how this function works?",
        "Help me out and explain the purpose of this code.",
    ],
    "docstring": [
        "Write a docstring for this function.",
        "Add a concise docstring to the following code.",
        "Please draft a docstring describing the parameters and return value.",
        "Produce a Google-style docstring for this snippet.",
        "Compose a helpful docstring for the code below.",
        "I would like a docstring for this function.",
        "Annotate this function with a clear docstring.",
        "Document the code below with a short docstring.",
    ],
    "tests": [
        "Write unit tests for this code.",
        "Create pytest tests covering the following function.",
        "Please add tests that exercise this snippet.",
        "Generate tests that check the edge cases of this code.",
        "I need a few tests to verify this function.",
        "Cover the code below with automated tests.",
        "Design tests that would catch bugs in this code.",
        "Produce thorough tests for this function.",
    ],
    "review": [
        "Please review this code and point out any bugs.",
        "Do a careful review of this function and list issues.",
        "I want a critical review of the following snippet.",
        "Give the code below a thorough review.",
        "Write a short review of this implementation.",
        "Could you review this function for mistakes?",
        "Perform a security review of this snippet.",
        "Can you review the code below and flag anything suspicious?",
    ],
}
PORT_TEMPLATES = [
    "Rewrite this code in {}.",
    "Port the following function to {}.",
    "Translate this snippet into idiomatic {}.",
    "Convert the code below to {}.",
    "Reimplement this function using {}.",
    "Show me how this code would look in {}.",
    "Produce an equivalent {} version of this code.",
    "Please transcribe this Python code into {}.",
]
LANGUAGES = {"rust": "Rust", "go": "Go", "java": "Java", "haskell": "Haskell"}
VARIANTS = ("instructions", "content-words")
HELD_OUT = 2
"""Paraphrases per family kept for evaluation only (the last ones of each list)."""


def family_paraphrases(variant: str) -> dict[str, list[str]]:
    """Family name -> its instruction paraphrases (train first, the last `HELD_OUT` held out)."""
    if variant == "instructions":
        return INSTRUCTIONS
    if variant == "content-words":
        return {name: [t.format(word) for t in PORT_TEMPLATES] for name, word in LANGUAGES.items()}
    raise ValueError(f"learn-bench variant must be one of {VARIANTS}, got {variant!r}")


@dataclass(frozen=True)
class Sample:
    family: int
    paraphrase: int
    messages: list[dict]


def _stdlib_lines() -> list[str]:
    """Non-empty source lines of a fixed set of standard-library modules (a deterministic corpus)."""
    root = Path(random.__file__).parent
    lines = []
    for name in (
        "json/encoder.py",
        "textwrap.py",
        "shlex.py",
        "fnmatch.py",
        "string.py",
        "bisect.py",
        "heapq.py",
        "difflib.py",
        "csv.py",
        "base64.py",
    ):
        path = root / name
        if path.is_file():
            lines += [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 500:
        raise RuntimeError(f"learn-bench: too few standard-library source lines found under {root}")
    return lines


def make_samples(variant: str, count: int, *, held_out: bool, seed: int) -> list[Sample]:
    """`count` chat samples, families in turn: a user message (an instruction paraphrase and a
    snippet) and an assistant reply (other source lines). Held-out samples use only the held-out
    paraphrases; training samples never do."""
    families = list(family_paraphrases(variant).values())
    lines = _stdlib_lines()
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        family = i % len(families)
        paraphrases = families[family]
        choices = (
            range(len(paraphrases) - HELD_OUT, len(paraphrases)) if held_out else range(len(paraphrases) - HELD_OUT)
        )
        paraphrase = rng.choice(list(choices))
        start = rng.randrange(len(lines) - 12)
        snippet = "\n".join(lines[start : start + rng.randint(2, 4)])
        reply_start = rng.randrange(len(lines) - 12)
        reply = "\n".join(lines[reply_start : reply_start + 3])
        messages = [
            {"role": "user", "content": f"{paraphrases[paraphrase]}\n\n```python\n{snippet}\n```"},
            {"role": "assistant", "content": reply},
        ]
        samples.append(Sample(family, paraphrase, messages))
    return samples


def random_lora(
    targets: Sequence, rank: int, generator: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unit-scale random factors per target: A ~ N(0, 1/in) [r, in], B ~ N(0, 1/r) [out, r]."""
    lora = {}
    for t in targets:
        a = torch.randn(rank, t.in_features, generator=generator) / t.in_features**0.5
        b = torch.randn(t.out_features, rank, generator=generator) / rank**0.5
        lora[t.name] = (a, b)
    return lora
