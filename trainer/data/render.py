"""Rendering: a decoded trajectory -> input ids, assistant-token loss mask and prompt ids."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from typing import Any

import datasets
import jinja2
from transformers import PreTrainedTokenizerBase

from hyperdistill.trainer.data.rows import (
    NO_ASSISTANT_TOKENS,
    PROMPT_TOO_LONG,
    RENDER_ERROR,
    BadRow,
    check_resolved,
    decode_row,
    prompt_end,
)

log = logging.getLogger(__name__)


STORED_FEATURES = {
    "trajectory_id": datasets.Value("string"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_mask": datasets.List(datasets.Value("bool")),
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
}


# Per-row bookkeeping for the summary; dropped before saving.
STATS_FEATURES = {
    "skip_reason": datasets.Value("string"),
    "full_length": datasets.Value("int32"),
    "num_loss_tokens": datasets.Value("int32"),
    "prompt_length": datasets.Value("int32"),
}


RENDERED_FEATURES = datasets.Features({**STORED_FEATURES, **STATS_FEATURES})


def render_trajectory(
    messages: list[dict], tools: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, Any]:
    """Tokenize one decoded trajectory with the tokenizer's chat template.

    Returns the stored columns but `trajectory_id` (`input_ids`, `loss_mask` [T],
    `prompt_ids` [P], `length` = T <= max_length) plus `full_length` (T before
    truncation), `num_loss_tokens` and `prompt_length` (P). Raises `BadRow` when the prompt
    alone exceeds `max_length`, when no assistant token survives truncation or when the
    template rejects the input.
    """
    tools_arg = tools or None
    prompt = _apply_template(tokenizer, messages[: prompt_end(messages)], tools_arg, with_mask=False)
    if len(prompt["input_ids"]) > max_length:
        raise BadRow(PROMPT_TOO_LONG, f"{len(prompt['input_ids'])} > {max_length} tokens")
    full = _apply_template(tokenizer, messages, tools_arg, with_mask=True)
    input_ids, mask = full["input_ids"], full["assistant_masks"]
    prompt_ids = prompt["input_ids"]
    if input_ids[: len(prompt_ids)] != prompt_ids:
        raise BadRow(RENDER_ERROR, "the rendered prompt is not a prefix of the rendered trajectory")
    loss_mask = [bool(m) for m in mask[:max_length]]
    num_loss_tokens = sum(loss_mask)
    if num_loss_tokens == 0:
        raise BadRow(NO_ASSISTANT_TOKENS)
    return {
        "input_ids": input_ids[:max_length],
        "loss_mask": loss_mask,
        "prompt_ids": prompt_ids,
        "length": len(loss_mask),
        "full_length": len(input_ids),
        "num_loss_tokens": num_loss_tokens,
        "prompt_length": len(prompt_ids),
    }


def render_prompt(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> list[int]:
    """The hypernetwork prompt's token ids of ``messages`` (system messages and the first user
    message), rendered exactly as `render_trajectory` renders ``prompt_ids``."""
    return list(
        _apply_template(tokenizer, messages[: prompt_end(messages)], tools or None, with_mask=False)["input_ids"]
    )


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless the chat template marks assistant turns for the loss mask.

    Without `{% generation %}` blocks transformers returns an all-zero assistant mask (and
    only warns), which would skip every row as `no_assistant_tokens`.
    """
    if not re.search(r"{%-?\s*generation\s*-?%}", tokenizer.chat_template or ""):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} blocks around the assistant "
            "turns, so it cannot give the assistant-token loss mask; published Qwen templates lack "
            "them: set student.chat_template (prepare_data: --chat-template) to "
            "common/chat_template.jinja, the Qwen3-Coder template with them"
        )


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None, *, with_mask: bool
) -> Mapping[str, list[int]]:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=with_mask
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise BadRow(RENDER_ERROR, f"{type(e).__name__}: {e}") from None


def _render_row(
    row: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, gold_only: bool
) -> dict[str, Any]:
    """All `RENDERED_FEATURES` columns of one row; a skipped row has a `skip_reason`."""
    trajectory_id = row.get("trajectory_id")
    try:
        if gold_only:
            check_resolved(row)
        messages, tools = decode_row(row)
        example = render_trajectory(messages, tools, tokenizer, max_length)
    except BadRow as bad:
        log.debug("skipping %s: %s", trajectory_id, bad)
        empty = {
            "input_ids": [],
            "loss_mask": [],
            "prompt_ids": [],
            "length": 0,
            "full_length": 0,
            "num_loss_tokens": 0,
            "prompt_length": 0,
        }
        return {"trajectory_id": str(trajectory_id or ""), **empty, "skip_reason": bad.reason}
    return {"trajectory_id": trajectory_id, **example, "skip_reason": ""}


class BatchRenderer:
    """The `datasets.map` function (batched): one `RENDERED_FEATURES` row per raw row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, gold_only: bool):
        self.tokenizer, self.max_length, self.gold_only = tokenizer, max_length, gold_only

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        size = len(next(iter(batch.values())))
        columns: dict[str, list] = {name: [] for name in RENDERED_FEATURES}
        for i in range(size):
            row = {k: v[i] for k, v in batch.items()}
            for name, value in _render_row(row, self.tokenizer, self.max_length, self.gold_only).items():
                columns[name].append(value)
        return columns

    def __getstate__(self) -> dict[str, Any]:
        # datasets sends the map function to its workers with dill, whose pure-Python
        # pickling of a 151k-entry vocabulary takes seconds; the C pickler, well under one.
        return {**vars(self), "tokenizer": pickle.dumps(self.tokenizer)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, tokenizer=pickle.loads(state["tokenizer"]))
