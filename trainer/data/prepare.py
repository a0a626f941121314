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
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from hyperdistill.common.dirs import dir_lock, replace_dir
from hyperdistill.common.tokenizer import tokenizer_fingerprint
from hyperdistill.trainer.data import DataConfig
from hyperdistill.trainer.data.render import RENDERED_FEATURES, STATS_FEATURES, BatchRenderer, check_chat_template
from hyperdistill.trainer.data.rows import load_source, local_files

log = logging.getLogger(__name__)


SUMMARY_FILE = "summary.json"


# Bump when the rendering or the stored columns change: it is part of the cache key.
FORMAT_VERSION = 1


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
        kept.remove_columns(list(STATS_FEATURES)).save_to_disk(str(work / "dataset"))
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
        BatchRenderer(tokenizer, config.max_length, gold_only=config.subset == "gold"),
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
    stats = kept.select_columns(["length", *STATS_FEATURES]).with_format("numpy")[:]
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
    files = local_files(source)
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


def load_summary(path: str | Path) -> PrepareSummary:
    """The summary saved beside a prepared dataset."""
    return PrepareSummary(**json.loads((Path(path) / SUMMARY_FILE).read_text()))
