"""``make bench``: measure P1-P6 of issue 7 and P7 of issue 15 and write ``<out>/report.json`` and ``<out>/report.md``.

    .venv/bin/python -m tests.bench.run --out runs/bench [--only P1,P5] [--repeats 3]

Order: the memory- and CPU-heavy single-process measures first (P5, P6), then the teacher
measures, which share servers: our teacher service (vLLM-CPU engine, the demo config) for the
recorded pass (P1, P2, P4's replay), P3's timed passes and P4's trainer runs; then ``vllm
serve`` (P1, P2, P3); then the engine in-process (P3). Each measure's failure is recorded in
the report and the others still run; the exit code is 1 if any failed. Numbers, not verdicts:
the report sets each figure beside its goal.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

from hyperdistill.common.log import setup_logging
from tests.bench import bench_report
from tests.bench.bench_common import machine_info

logger = logging.getLogger(__name__)

MEASURES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmarks of issue 7: P1-P6 into a JSON and a Markdown report.")
    parser.add_argument("--out", default="runs/bench", help="output directory (report.json, report.md, logs)")
    parser.add_argument("--only", default=",".join(MEASURES), help="comma-separated measures to run, e.g. P1,P5")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repetitions of P2, P3 and P6 (P4's samples are its steps, P5 has --p5-repeats)",
    )
    parser.add_argument("--p2-positions", type=int, default=32768, help="positions of the P1/P2 pass")
    parser.add_argument("--p3-positions", type=int, default=8192, help="positions of each P3 pass")
    parser.add_argument("--p7-repeats", type=int, default=2, help="P7's trainer speed runs per variant (alternating)")
    parser.add_argument("--p4-steps", type=int, default=4, help="optimizer steps per P4 trainer run (3 runs)")
    parser.add_argument("--p5-positions", type=int, default=8192, help="T of the P5 losses")
    parser.add_argument(
        "--p5-repeats",
        type=int,
        default=1,
        help="P5 forward+backward repetitions (~1 min each at T=8k here; the peak memory is exact)",
    )
    args = parser.parse_args()
    args.selected = [m.strip().upper() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(args.selected) - set(MEASURES))
    if unknown or args.repeats < 1:
        parser.error(f"--only takes {','.join(MEASURES)} (got {','.join(unknown)}); --repeats must be >= 1")
    return args


class Report:
    """The report being built; written out after every measure, so a crash keeps what was measured."""

    def __init__(self, out: Path, args: argparse.Namespace):
        self.out = out
        self.data = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": _command(args),
            "settings": {k: v for k, v in vars(args).items() if k not in ("only",)},
            "machine": machine_info(),
            "measures": {},
            "errors": {},
        }

    def measure(self, names: list[str], fn, label: str | None = None) -> None:
        """Run ``fn()`` -> {measure: result}; on failure record the error under each of ``names``."""
        label = label or "/".join(names)
        start = time.perf_counter()
        try:
            results = fn()
        except Exception:
            logger.exception("%s failed", label)
            for name in names:  # the first failure is the cause; later ones follow from it
                self.data["errors"].setdefault(name, traceback.format_exc(limit=8))
        else:
            self.data["measures"].update(results)
        logger.info("%s took %.0f s", label, time.perf_counter() - start)
        self.write()

    def write(self) -> None:
        self.data["load_average_end"] = machine_info()["load_average_1_5_15"]
        (self.out / "report.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "report.md").write_text(bench_report.render(self.data))


def main() -> None:
    args = parse_args()
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, args)
    start = time.perf_counter()
    selected = set(args.selected)
    if "P5" in selected:
        from tests.bench import bench_loss

        report.measure(["P5"], lambda: {"P5": bench_loss.run(out, args.p5_positions, args.p5_repeats)})
    if "P6" in selected:
        from tests.bench import bench_lora

        report.measure(["P6"], lambda: {"P6": bench_lora.run(out, args.repeats)})
    if selected & {"P1", "P2", "P3", "P4"}:
        from tests.bench.bench_teacher import teacher_measures

        teacher_measures(report, out, args, selected)
    if "P7" in selected:
        from tests.bench import bench_cache, bench_cache_encoding

        report.measure(
            ["P7"],
            lambda: {"P7": {**bench_cache.run(out, args.p7_repeats), "encodings": bench_cache_encoding.measure(4096)}},
        )
    report.data["total_seconds"] = time.perf_counter() - start
    report.write()
    print(bench_report.render(report.data))
    logger.info("report: %s, %s", out / "report.md", out / "report.json")
    raise SystemExit(1 if report.data["errors"] else 0)


def _command(args: argparse.Namespace) -> str:
    import sys

    return " ".join(["python -m tests.bench.run", *sys.argv[1:]])


if __name__ == "__main__":
    main()
