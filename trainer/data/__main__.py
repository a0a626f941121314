"""Prepare the training data: render, tokenize and mask the trajectories once, to disk.

    python -m hyperdistill.trainer.data --tokenizer STUDENT_DIR [--source ...] [--out DIR]

Without `--out` the examples go where the trainer looks for them
(`<cache-dir>/<source>-<key>`, see `trainer.data.prepared_dir`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hyperdistill.common.log import setup_logging
from hyperdistill.common.tokenizer import load_tokenizer
from hyperdistill.trainer.data import DataConfig
from hyperdistill.trainer.data.prepare import prepare, prepared_dir

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DataConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="student model directory whose tokenizer and chat template render the data",
    )
    parser.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        help="Jinja file replacing the tokenizer's chat template (the trainer's "
        "student.chat_template); it needs {%% generation %%} blocks",
    )
    parser.add_argument(
        "--source",
        default=defaults.source,
        help="hub dataset name, or a local .jsonl/.parquet file or directory of them (default: %(default)s)",
    )
    parser.add_argument("--split", default=defaults.split, help="split to load (default: %(default)s)")
    parser.add_argument(
        "--subset",
        choices=("gold", "all"),
        default=defaults.subset,
        help="gold: resolved trajectories only; all: every trajectory (default: %(default)s)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="tokens per example; longer ones keep their start (default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default=defaults.cache_dir,
        help="root of the prepared datasets and the datasets cache (default: %(default)s)",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=defaults.num_proc,
        help="processes that tokenize in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the trainer's cache entry under --cache-dir)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="logging level; DEBUG lists every skipped row and why (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level)
    config = DataConfig(
        source=args.source,
        split=args.split,
        subset=args.subset,
        max_length=args.max_length,
        cache_dir=args.cache_dir,
        num_proc=args.num_proc,
        token_budget=args.max_length,
    )  # batching is not part of preparation
    tokenizer = load_tokenizer(args.tokenizer, args.chat_template)
    out = args.out if args.out is not None else prepared_dir(config, tokenizer)
    log.info("preparing %s -> %s", config, out)
    summary = prepare(config, tokenizer, out)
    print(summary.format())
    print(f"saved to {out} (summary: {out / 'summary.json'})")


if __name__ == "__main__":
    main()
