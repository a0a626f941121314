"""`make chaos`: the teacher service under bad input (R1), load (R4) and SIGTERM under load (R5);
training through teacher kills (R2) and trainer kills (R3).

    python -m tests.chaos.run [--engine vllm|hf] [--requests 1000] [--streams 16] [--per-stream 100]
                              [--fault-steps 12] [--kills 5]

Starts real teacher servers on free loopback ports (the tiny teacher), prints a table of counts
per scenario and exits non-zero when any outcome differs from the documented one. R2 and R3 run
torchrun x2 on CPU against transformers teachers (bitwise reproducible answers, whatever
``--engine``) and compare every disturbed run with an uninterrupted one (tests/chaos/faults.py).
A reduced version runs in `make test` (tests/test_chaos.py, tests/test_chaos_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from tests.chaos.bad_input import format_bad_input, run_bad_input
from tests.chaos.faults import FaultBench, fault_ok, format_faults, run_faults
from tests.chaos.load import CLIENT_MASKED, run_load, run_sigterm_under_load, server_internal_errors
from tests.devtools.teacher_process import TeacherProcess
from tests.devtools.tiny_models import ensure_tiny_models

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy/configs/teacher.cpu.yaml"
ADMISSION_LIMIT = 20000  # positions: R4 below it (16 streams x 2 x <= 256 tokens), R1 never reaches it
GRACE_SECONDS = 60.0


def teacher(engine: str, log_dir: Path, name: str) -> TeacherProcess:
    overrides = [
        f"engine.model={ensure_tiny_models().teacher}",
        f"engine.kind={engine}",
        f"server.max_queued_positions={ADMISSION_LIMIT}",
        f"server.grace_seconds={GRACE_SECONDS}",
    ]
    return TeacherProcess(CONFIG, overrides, log_path=log_dir / f"{name}.log")


def r4_ok(result: dict) -> bool:
    exhausted = all(
        key == "OK" or key.startswith("RESOURCE_EXHAUSTED") or key == CLIENT_MASKED for key in result["above_statuses"]
    )
    return (
        result["below_statuses"] == {"OK": result["streams"]}
        and result["below_lost"] == 0
        and exhausted
        and result["above_lost"] == 0
        and result["served_after"]
    )


def r5_ok(result: dict) -> bool:
    """Health NOT_SERVING within 1 s, every stream ends OK or refused UNAVAILABLE (draining), none
    lost, exit 0 within the grace. A stream refused while its client was still writing can end in
    grpc.aio's client-side `CLIENT_MASKED` instead (grpc/grpc#36066, as in R4): accepted, and its
    requests are not counted (the client lost which one the server refused)."""
    drained = all(key == "OK" or key.startswith("UNAVAILABLE") or key == CLIENT_MASKED for key in result["statuses"])
    return (
        result["not_serving_after_s"] is not None
        and result["not_serving_after_s"] < 1.0
        and drained
        and result["lost"] == 0
        and result["exit_code"] == 0
        and result["exit_after_s"] <= result["grace_s"] + 5
    )


def format_load(r4: dict, r5: dict) -> str:
    mib = r4["peak_rss_bytes"] / 2**20
    return "\n".join(
        [
            f"R4 load: {r4['streams']} streams x {r4['per_stream']} requests, "
            f"admission limit {ADMISSION_LIMIT} positions",
            f"  below the limit: {r4['below_answered']} answered, {r4['below_lost']} lost, "
            f"streams {r4['below_statuses']}, "
            f"p50 {r4['p50_s'] * 1e3:.0f} ms, p99 {r4['p99_s'] * 1e3:.0f} ms, {r4['below_seconds']:.1f} s",
            f"  far above it:    {r4['above_answered']} answered, {r4['above_lost']} lost, "
            f"streams {r4['above_statuses']}",
            f"  server peak RSS {mib:.0f} MiB; serving afterwards: {r4['served_after']}  "
            f"-> {'ok' if r4_ok(r4) else 'FAILED'}",
            f"R5 SIGTERM under load: NOT_SERVING after {r5['not_serving_after_s']} s, {r5['answered']} answered, "
            f"{r5['lost']} lost, streams {r5['statuses']}, exit {r5['exit_code']} after {r5['exit_after_s']:.1f} s "
            f"(grace {r5['grace_s']:.0f} s)  -> {'ok' if r5_ok(r5) else 'FAILED'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engine", choices=("vllm", "hf"), default="vllm", help="teacher engine (default: %(default)s)"
    )
    parser.add_argument("--requests", type=int, default=1000, help="R1 generated requests (default: %(default)s)")
    parser.add_argument("--streams", type=int, default=16, help="R4 concurrent streams (default: %(default)s)")
    parser.add_argument("--per-stream", type=int, default=100, help="R4 requests per stream (default: %(default)s)")
    parser.add_argument(
        "--fault-steps", type=int, default=12, help="R2/R3 training steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--kills", type=int, default=5, help="R2 teacher kills and R3 trainer kills (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator and kill-point seed (default: %(default)s)")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="chaos-"))
    with teacher(args.engine, log_dir, "teacher") as server:
        r1 = asyncio.run(run_bad_input(server.address, args.requests, args.seed))
        r4 = asyncio.run(run_load(server.address, server.proc.pid, args.streams, args.per_stream, args.seed))
        alive = server.proc.poll() is None
        internal = server_internal_errors(server.metrics_url)
    print(format_bad_input(r1))
    print(
        f"server alive after R1 and R4: {alive}; requests the server answered INTERNAL: {internal:.0f} "
        f"(a client-side '{CLIENT_MASKED}' is grpc/grpc#36066, counted apart)"
    )
    doomed = teacher(args.engine, log_dir, "sigterm").start()
    try:
        doomed.wait_serving()
        r5 = asyncio.run(run_sigterm_under_load(doomed.address, doomed.proc, GRACE_SECONDS, seed=args.seed))
    finally:
        doomed.stop()
    print(format_load(r4, r5), flush=True)
    faults = run_faults(
        FaultBench(work=log_dir / "faults", models=ensure_tiny_models(), steps=args.fault_steps), args.kills, args.seed
    )
    print(format_faults(faults))
    print(f"teacher and trainer logs: {log_dir}")
    r1_ok = all(o.expected + o.masked == o.sent for o in r1["outcomes"].values()) and r1["reference_identical"]
    return 0 if r1_ok and alive and internal == 0 and r4_ok(r4) and r5_ok(r5) and all(map(fault_ok, faults)) else 1


if __name__ == "__main__":
    sys.exit(main())
