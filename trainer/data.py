"""Training data: SWE-rebench-openhands trajectories -> tokenized, masked examples on disk.

`prepare` loads the dataset with `datasets` (a hub name, or local parquet/jsonl files: the
same code path), keeps the gold set (`resolved == 1`) unless told otherwise, decodes each
row (nested structs or JSON strings; tool-call arguments `json.loads`-ed into mappings),
renders it with the student tokenizer's chat template and saves one example per kept row:

    trajectory_id  str
    input_ids      int32 [T]  the rendered trajectory, T <= max_length (the start is kept)
    loss_mask      bool  [T]  True on assistant tokens (content, tool-call XML, <|im_end|>),
                              False on everything of system, user and tool messages
    prompt_ids     int32 [P]  the hypernetwork prompt: system + first user message rendered
                              by the same template; never cut, and equal to input_ids[:P]
    length         int32      T

Rows that cannot become an example are skipped and counted by reason (`SKIP_REASONS`);
`summary.json` beside the data holds the counts, token-length percentiles and throughput.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase

from common.dirs import dir_lock, replace_dir
from common.tokenizer import tokenizer_fingerprint
from trainer.sampler import LengthBucketSampler

log = logging.getLogger(__name__)

HUB_DATASET = "nebius/SWE-rebench-openhands-trajectories"
SUMMARY_FILE = "summary.json"
# Bump when the rendering or the stored columns change: it is part of the cache key.
FORMAT_VERSION = 1
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")

NOT_RESOLVED = "not_resolved"
MISSING_FIELD = "missing_field"
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
BAD_ARGUMENTS = "bad_arguments"
UNKNOWN_ROLE = "unknown_role"
EMPTY_TRAJECTORY = "empty_trajectory"
NO_USER_MESSAGE = "no_user_message"
RENDER_ERROR = "render_error"
PROMPT_TOO_LONG = "prompt_too_long"
NO_ASSISTANT_TOKENS = "no_assistant_tokens"
SKIP_REASONS = (
    NOT_RESOLVED,
    MISSING_FIELD,
    BAD_JSON,
    BAD_MESSAGE,
    BAD_ARGUMENTS,
    UNKNOWN_ROLE,
    EMPTY_TRAJECTORY,
    NO_USER_MESSAGE,
    RENDER_ERROR,
    PROMPT_TOO_LONG,
    NO_ASSISTANT_TOKENS,
)

STORED_FEATURES = {
    "trajectory_id": datasets.Value("string"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_mask": datasets.List(datasets.Value("bool")),
    "prompt_ids": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
}
# Per-row bookkeeping for the summary; dropped before saving.
_STATS_FEATURES = {
    "skip_reason": datasets.Value("string"),
    "full_length": datasets.Value("int32"),
    "num_loss_tokens": datasets.Value("int32"),
    "prompt_length": datasets.Value("int32"),
}
RENDERED_FEATURES = datasets.Features({**STORED_FEATURES, **_STATS_FEATURES})


@dataclass(kw_only=True)
class DataConfig:
    """Where the trajectories come from and how they become batches."""

    source: str = HUB_DATASET
    """Hub dataset name, or a local .parquet/.jsonl file or a directory of them."""
    split: str = "train"
    """Split to load; local files are loaded as this split."""
    subset: str = "gold"
    """`gold`: resolved trajectories only (`resolved == 1`); `all`: every trajectory."""
    max_length: int = 32768
    """Tokens per example: longer trajectories keep their start; one whose prompt alone is
    longer is skipped. Each value gets its own prepared dataset."""
    token_budget: int = 32768
    """Padded tokens per micro-batch on one rank (batch size x longest example)."""
    seed: int = 0
    """Seed of the per-epoch shuffle."""
    cache_dir: str = ".cache/data"
    """Root of the prepared datasets (one directory per source, settings and tokenizer) and
    of `datasets`' own download and Arrow cache."""
    num_proc: int = 1
    """Processes that render and tokenize in parallel (`datasets.Dataset.map`)."""

    def __post_init__(self) -> None:
        if self.subset not in ("gold", "all"):
            raise ValueError(f"data.subset must be 'gold' or 'all', got {self.subset!r}")
        if self.max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.token_budget < self.max_length:
            raise ValueError(
                f"data.token_budget ({self.token_budget}) must be >= data.max_length "
                f"({self.max_length}): a full-length example must fit in a batch"
            )
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {self.num_proc}")


class BadRow(Exception):
    """A row that cannot become a training example; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class PrepareSummary:
    """What one preparation run read, kept, skipped and how fast it went."""

    source: str
    split: str
    subset: str
    max_length: int
    rows: int
    """Rows read from the source."""
    kept: int
    """Examples written."""
    skipped: dict[str, int]
    """Rows not written, by reason (`SKIP_REASONS`)."""
    skipped_examples: dict[str, list[str]]
    """The first few trajectory ids skipped for each reason (rerun with DEBUG logging for details)."""
    truncated: int
    """Kept examples cut to `max_length`."""
    length: dict[str, int]
    """p50/p90/p99/max of the stored lengths (after truncation)."""
    full_length: dict[str, int]
    """p50/p90/p99/max of the rendered lengths of the kept examples (before truncation)."""
    prompt_length: dict[str, int]
    """p50/p90/p99/max of the hypernetwork prompt lengths."""
    tokens: int
    """Stored tokens."""
    assistant_tokens: int
    """Stored tokens under the loss mask."""
    assistant_share: float
    """assistant_tokens / tokens."""
    render_seconds: float
    """Wall time of the render-and-tokenize pass."""
    total_seconds: float
    """Wall time of the whole preparation (load, render, filter, save)."""
    tokens_per_second: float
    """Rendered tokens of the kept examples (before truncation) / render_seconds."""

    def format(self) -> str:
        """A human-readable report (the CLI prints it)."""
        skipped = [
            f"    {reason:<20}{count:>7,}  e.g. {', '.join(self.skipped_examples[reason])}"
            for reason, count in self.skipped.items()
        ]
        share = f"{100 * self.assistant_share:.1f}%"

        def pct(name: str, values: dict[str, int]) -> str:
            return f"  {name:<14}" + "  ".join(f"{k} {v:>7,}" for k, v in values.items())

        return "\n".join(
            [
                f"prepared {self.kept:,} of {self.rows:,} rows from {self.source} "
                f"(split {self.split}, subset {self.subset}, max_length {self.max_length:,})",
                f"  skipped       {sum(self.skipped.values()):,}",
                *skipped,
                f"  truncated     {self.truncated:,}",
                f"  tokens        {self.tokens:,} stored, {self.assistant_tokens:,} assistant ({share})",
                pct("length", self.length),
                pct("full length", self.full_length),
                pct("prompt length", self.prompt_length),
                f"  throughput    {self.tokens_per_second:,.0f} tokens/s "
                f"(render {self.render_seconds:.1f} s, total {self.total_seconds:.1f} s)",
            ]
        )


def load_source(config: DataConfig) -> datasets.Dataset:
    """The raw dataset: `load_dataset(name, split=...)` for a hub name, the `json`/`parquet`
    builder on `data_files` for local files."""
    cache = str(Path(config.cache_dir) / "hf")
    files = _local_files(config.source)
    if files is None:
        return datasets.load_dataset(config.source, split=config.split, cache_dir=cache)
    builder = LOCAL_BUILDERS[files[0].suffix]
    data_files = {config.split: [str(f) for f in files]}
    return datasets.load_dataset(builder, data_files=data_files, split=config.split, cache_dir=cache)


def _local_files(source: str) -> list[Path] | None:
    """The local data files `source` names (a file or a directory), None for a hub name."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_BUILDERS)
    elif path.is_file():
        files = [path]
    elif path.suffix in LOCAL_BUILDERS:
        raise FileNotFoundError(f"data source {source} does not exist")
    else:
        return None
    builders = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"data source {source}: expected .jsonl or .parquet files of one kind, got {files}")
    return files


def decode_row(row: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of one dataset row, ready for `apply_chat_template`.

    Accepts `trajectory`/`tools` as nested lists/structs or as JSON strings. Messages keep
    only the fields the template reads; tool-call arguments become mappings. Raises
    `BadRow` for anything that is not a well-formed trajectory with a prompt.
    """
    for name in ("trajectory_id", "trajectory", "tools"):
        if row.get(name) is None:
            raise BadRow(MISSING_FIELD, name)
    raw_tools = row["tools"]
    # Arrow struct columns give every struct the union of all structs' fields, the
    # missing ones as null: drop those so each tool schema renders as it was written.
    tools = _json_list(raw_tools, "tools")
    if not isinstance(raw_tools, str):
        tools = [_drop_nulls(tool) for tool in tools]
    messages = [_decode_message(m) for m in _json_list(row["trajectory"], "trajectory")]
    if not messages:
        raise BadRow(EMPTY_TRAJECTORY)
    prompt_end(messages)
    return messages, tools


def _loads(text: str, reason: str, what: str) -> Any:
    """json.loads, or BadRow(reason) naming `what` and the parser's message."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(reason, f"{what}: {e}") from None


def _json_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        value = _loads(value, BAD_JSON, name)
    if not isinstance(value, list):
        raise BadRow(BAD_JSON, f"{name} is a {type(value).__name__}, not a list")
    return value


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _decode_message(raw: Any) -> dict:
    """One message with the fields of its role; tool-call arguments parsed."""
    if not isinstance(raw, Mapping):
        raise BadRow(BAD_MESSAGE, f"message is a {type(raw).__name__}")
    role = raw.get("role")
    if role is None:
        raise BadRow(MISSING_FIELD, "role")
    if role not in ROLES:
        raise BadRow(UNKNOWN_ROLE, repr(role))
    content = raw.get("content")
    if content is None and role != "assistant":
        raise BadRow(MISSING_FIELD, f"{role}.content")
    if content is not None and not isinstance(content, str):
        raise BadRow(BAD_MESSAGE, f"{role}.content is a {type(content).__name__}")
    message = {"role": role, "content": content or ""}
    if role == "assistant" and raw.get("tool_calls"):
        message["tool_calls"] = [_decode_tool_call(call) for call in raw["tool_calls"]]
    if role == "tool":
        message.update({k: raw[k] for k in ("name", "tool_call_id") if raw.get(k) is not None})
    return message


def _decode_tool_call(raw: Any) -> dict:
    function = raw.get("function") if isinstance(raw, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise BadRow(BAD_MESSAGE, "tool call without function.name")
    arguments = function.get("arguments")
    if arguments is None:
        raise BadRow(MISSING_FIELD, "tool_calls.function.arguments")
    if isinstance(arguments, str):
        arguments = _loads(arguments, BAD_ARGUMENTS, function["name"])
    if not isinstance(arguments, Mapping):
        raise BadRow(BAD_ARGUMENTS, f"{function['name']}: arguments are a {type(arguments).__name__}")
    call = {"type": "function", "function": {"name": function["name"], "arguments": dict(arguments)}}
    if raw.get("id") is not None:
        call["id"] = raw["id"]
    return call


def prompt_end(messages: list[dict]) -> int:
    """Number of leading messages in the hypernetwork prompt: the system messages and the
    first user message. Raises `BadRow` if an assistant or tool message comes first."""
    for i, message in enumerate(messages):
        if message["role"] == "user":
            return i + 1
        if message["role"] != "system":
            break
    raise BadRow(NO_USER_MESSAGE)


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
            _check_resolved(row)
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


def _check_resolved(row: Mapping[str, Any]) -> None:
    resolved = row.get("resolved")
    if resolved is None:
        raise BadRow(MISSING_FIELD, "resolved")
    if resolved != 1:
        raise BadRow(NOT_RESOLVED)


class _BatchRenderer:
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


def prepare(config: DataConfig, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> PrepareSummary:
    """Load, filter, render and tokenize `config.source`; save the examples to `out_dir`.

    Writes `datasets.Dataset.save_to_disk` files (`STORED_FEATURES`) plus `summary.json`
    into a sibling temporary directory and renames it into place, replacing any previous
    `out_dir`, so a killed run never leaves a half-written dataset behind.
    """
    start = time.monotonic()
    check_chat_template(tokenizer)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = load_source(config)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-build-", dir=out.parent))
    try:
        render_start = time.monotonic()
        rendered = _render(raw, config, tokenizer, work / "cache")
        render_seconds = time.monotonic() - render_start
        kept = rendered.filter(
            lambda reasons: [r == "" for r in reasons],
            input_columns="skip_reason",
            batched=True,
            desc="drop skipped rows",
        )
        kept.remove_columns(list(_STATS_FEATURES)).save_to_disk(str(work / "dataset"))
        summary = _summarize(config, rendered, kept, render_seconds, time.monotonic() - start)
        (work / "dataset" / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
        replace_dir(work / "dataset", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %d examples to %s", summary.kept, out)
    return summary


def _render(
    raw: datasets.Dataset, config: DataConfig, tokenizer: PreTrainedTokenizerBase, cache: Path
) -> datasets.Dataset:
    """Map every raw row to `RENDERED_FEATURES`, with datasets' progress bar."""
    cache.mkdir()
    return raw.map(
        _BatchRenderer(tokenizer, config.max_length, gold_only=config.subset == "gold"),
        batched=True,
        batch_size=16,
        writer_batch_size=64,  # rows are up to max_length tokens each: bound the writer's memory
        remove_columns=raw.column_names,
        features=RENDERED_FEATURES,
        num_proc=config.num_proc if config.num_proc > 1 else None,
        load_from_cache_file=False,
        cache_file_name=str(cache / "rendered.arrow"),
        # An explicit fingerprint spares datasets from hashing the tokenizer inside the function.
        new_fingerprint=hashlib.sha256(str(cache).encode()).hexdigest()[:16],
        desc="render and tokenize",
    )


def _summarize(
    config: DataConfig, rendered: datasets.Dataset, kept: datasets.Dataset, render_seconds: float, total_seconds: float
) -> PrepareSummary:
    skipped, examples = _skipped_rows(rendered)
    stats = kept.select_columns(["length", *_STATS_FEATURES]).with_format("numpy")[:]
    length, full_length, prompt_length = stats["length"], stats["full_length"], stats["prompt_length"]
    tokens, assistant = int(length.sum()), int(stats["num_loss_tokens"].sum())
    rendered_tokens = int(full_length.sum())
    return PrepareSummary(
        source=config.source,
        split=config.split,
        subset=config.subset,
        max_length=config.max_length,
        rows=len(rendered),
        kept=len(kept),
        skipped=skipped,
        skipped_examples=examples,
        truncated=int((full_length > length).sum()),
        length=percentiles(length),
        full_length=percentiles(full_length),
        prompt_length=percentiles(prompt_length),
        tokens=tokens,
        assistant_tokens=assistant,
        assistant_share=assistant / tokens if tokens else 0.0,
        render_seconds=round(render_seconds, 3),
        total_seconds=round(total_seconds, 3),
        tokens_per_second=round(rendered_tokens / render_seconds, 1) if render_seconds > 0 else 0.0,
    )


def _skipped_rows(
    rendered: datasets.Dataset, examples_per_reason: int = 3
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Count of skipped rows by reason, and the first trajectory ids of each reason."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for reason, trajectory_id in zip(rendered["skip_reason"], rendered["trajectory_id"], strict=True):
        if reason:
            counts[reason] += 1
            if counts[reason] <= examples_per_reason:
                examples.setdefault(reason, []).append(trajectory_id)
    return dict(sorted(counts.items())), dict(sorted(examples.items()))


def percentiles(values: np.ndarray) -> dict[str, int]:
    """p50/p90/p99/max of int [N] values (all zero when N = 0)."""
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="nearest")
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(np.max(values))}


def prepared_dir(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Path:
    """`cache_dir/<source name>-<key>`: the key hashes everything the examples depend on
    (source, split, subset, max_length, tokenizer fingerprint, chat template, format)."""
    key = {
        "format": FORMAT_VERSION,
        "source": _source_identity(config.source),
        "split": config.split,
        "subset": config.subset,
        "max_length": config.max_length,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "chat_template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(config.source).stem or "data")
    return Path(config.cache_dir) / f"{name}-{digest}"


def _source_identity(source: str) -> Any:
    """Hub name as is; local files by resolved path, size and modification time."""
    files = _local_files(source)
    if files is None:
        return source
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def load_prepared(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """The prepared examples for `config` and `tokenizer`, preparing them first if missing.

    Safe to call from every rank at once: an exclusive file lock makes one process
    prepare while the others wait, then all load the same directory.
    """
    path = prepared_dir(config, tokenizer)
    with dir_lock(path):
        if not (path / SUMMARY_FILE).is_file():
            log.info("no prepared data at %s: preparing", path)
            prepare(config, tokenizer, path)
    return datasets.load_from_disk(str(path))


def build(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, *, rank: int = 0, world_size: int = 1
) -> tuple[datasets.Dataset, LengthBucketSampler]:
    """The prepared examples (prepared first if missing) and this rank's batch sampler."""
    dataset = load_prepared(config, tokenizer)
    sampler = LengthBucketSampler(
        dataset["length"], token_budget=config.token_budget, seed=config.seed, rank=rank, world_size=world_size
    )
    return dataset, sampler


def load_summary(path: str | Path) -> PrepareSummary:
    """The summary saved beside a prepared dataset."""
    return PrepareSummary(**json.loads((Path(path) / SUMMARY_FILE).read_text()))
