"""P1-P3: our gRPC teacher vs ``vllm serve`` vs the engine in-process, on the same sequences.

- P1: bytes per scored position at K=20 over the P2 sequences: our ScoreChunks (packed
  payload, serialized messages, + gRPC's 5-byte message prefix) vs the HTTP response bodies.
- P2: from received bytes to ``[P, K]`` torch tensors for those sequences (32,768 positions):
  ``ScoreChunk.FromString`` + ``TopKAssembler`` vs ``json.loads`` + a loop over the entries.
- P3: positions/s over the P3 sequences: through our server (4 concurrent Score streams), the
  same engine in-process (``bench_inprocess``), and ``vllm serve`` (4 concurrent connections),
  all three up at once and their passes interleaved, so load changes hit them alike.

The sequences are the demo's prepared trajectories (real chat-template text), cycled and cut to
the position count. All three serve the tiny teacher with ``deploy/configs/teacher.cpu.yaml``'s
engine settings; our server sends float16 log-probs, as in the demo.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.bench.bench_common import TOP_K, summarize
from tests.bench.bench_grpc import Scored, decode_chunks, score_streams
from tests.bench.bench_inprocess import InProcessEngine
from tests.bench.bench_vllm_serve import VllmServe, decode_bodies, score_http

logger = logging.getLogger(__name__)

STREAMS = 4


@dataclass
class TeacherData:
    """What the passes collected, for the P1-P3 figures."""

    recorded: Scored | None = None
    bodies: list[bytes] | None = None
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"server": [], "inprocess": [], "vllm_serve": []})


def warm_up(sequences) -> list:
    """One sequence of up to 2,049 tokens: a full engine step, so first-pass allocations are done."""
    return [sequences[0][:2049]]


def record_pass(address: str, sequences, data: TeacherData) -> None:
    """Our server's pass over the P2 sequences (after a warm-up), keeping every chunk."""
    score_streams(address, warm_up(sequences), TOP_K, STREAMS)
    data.recorded = score_streams(address, sequences, TOP_K, STREAMS)
    logger.info("gRPC pass: %d positions in %.1f s", data.recorded.positions, data.recorded.seconds)


def peer_passes(
    out: Path,
    model: Path,
    address: str,
    p2_sequences,
    p3_sequences,
    data: TeacherData,
    repeats: int,
    record: bool,
    p3: bool,
) -> None:
    """With ``vllm serve`` and (for P3) the in-process engine up beside our server: the JSON pass
    over the P2 sequences, then the P3 rounds, one pass per path each, in rotating order."""
    from tests.devtools.teacher_process import free_port

    with contextlib.ExitStack() as stack:
        http = VllmServe(model, free_port(), out / "vllm_serve.log", TOP_K).start()
        stack.callback(http.stop)
        inprocess = None
        if p3:  # loads while vllm serve loads
            path = out / "p3_sequences.npz"
            np.savez(path, **{f"s{i}": s for i, s in enumerate(p3_sequences)})
            inprocess = InProcessEngine(path, out / "inprocess.log").start()
            stack.callback(inprocess.__exit__)
        http.__enter__()
        if inprocess is not None:
            inprocess.__enter__()
        score_http(http.port, warm_up(p2_sequences or p3_sequences), TOP_K, STREAMS)
        if record:
            data.bodies, seconds = score_http(http.port, p2_sequences, TOP_K, STREAMS)
            logger.info("HTTP pass: %d bodies in %.1f s", len(data.bodies), seconds)
        if p3:
            p3_rounds(address, http.port, inprocess, p3_sequences, data, repeats)


def p3_rounds(
    address: str, http_port: int, inprocess: InProcessEngine, sequences, data: TeacherData, repeats: int
) -> None:
    score_streams(address, warm_up(sequences), TOP_K, STREAMS)
    passes = {
        "server": lambda: score_streams(address, sequences, TOP_K, STREAMS).seconds,
        "inprocess": inprocess.run_pass,
        "vllm_serve": lambda: score_http(http_port, sequences, TOP_K, STREAMS)[1],
    }
    names = list(passes)
    for r in range(repeats):
        for name in names[r % 3 :] + names[: r % 3]:
            data.seconds[name].append(passes[name]())


def p1(data: TeacherData) -> dict:
    positions = data.recorded.positions
    ours = data.recorded.wire_bytes()
    minimum = TOP_K * (4 + 2)
    http = sum(len(b) for b in data.bodies)
    per = {k: v / positions for k, v in ours.items() if k != "chunks"}
    return {
        "positions": positions,
        "sequences": len(data.recorded.results),
        "top_k": TOP_K,
        "wire_dtype": "float16",
        "packed_minimum_B": minimum,
        "chunks": ours["chunks"],
        "ours_payload_B": per["payload"],
        "ours_message_B": per["messages"],
        "ours_framed_B": per["messages_framed"],
        "vllm_json_B": http / positions,
        "ours_vs_minimum": per["messages_framed"] / minimum,
        "json_vs_ours": (http / positions) / per["messages_framed"],
    }


def p2(data: TeacherData, sequences, repeats: int) -> dict:
    serialized = [[c.SerializeToString() for c in per_seq] for per_seq in data.recorded.chunks]
    ours_s, json_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = decode_chunks(serialized, TOP_K)
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        parsed = decode_bodies(data.bodies, sequences, TOP_K)
        json_s.append(time.perf_counter() - start)
    positions = data.recorded.positions
    ours_m, json_m = summarize(ours_s), summarize(json_s)
    return {
        "positions": positions,
        "ours_s": ours_m,
        "json_s": json_m,
        "ours_ns_per_position": 1e9 * ours_m["median"] / positions,
        "json_ns_per_position": 1e9 * json_m["median"] / positions,
        "json_vs_ours": json_m["median"] / ours_m["median"],
        **agreement(ours, parsed),
    }


def agreement(ours: list, parsed: list) -> dict:
    """Do both servers answer the same? Share of equal top-K ids, largest log-prob difference."""
    ids_equal = sum(int((a[0] == b[0]).sum()) for a, b in zip(ours, parsed, strict=True))
    total = sum(a[0].numel() for a in ours)
    diff = max(float((a[1] - b[1]).abs().max()) for a, b in zip(ours, parsed, strict=True))
    target = max(float((a[2] - b[2]).abs().max()) for a, b in zip(ours, parsed, strict=True))
    return {"ids_equal_share": ids_equal / total, "max_abs_logprob_diff": diff, "max_abs_target_diff": target}


def p3(data: TeacherData, positions: int) -> dict:
    rates = {name: summarize([positions / s for s in seconds]) for name, seconds in data.seconds.items()}
    return {
        "positions": positions,
        "streams": STREAMS,
        "server_positions_per_s": rates["server"],
        "inprocess_positions_per_s": rates["inprocess"],
        "vllm_serve_positions_per_s": rates["vllm_serve"],
        "server_vs_inprocess": rates["server"]["median"] / rates["inprocess"]["median"],
        "server_vs_vllm_serve": rates["server"]["median"] / rates["vllm_serve"]["median"],
    }


def teacher_measures(report, out: Path, args, selected: set[str]) -> None:
    """P1-P4 in the order that shares servers: our server alone for the recorded pass and P4's
    trainer runs, then ``vllm serve`` and the in-process engine beside it for the JSON pass and P3."""
    from tests.bench.bench_common import TEACHER_CPU_CONFIG, demo_sequences
    from tests.devtools.teacher_process import TeacherProcess
    from tests.devtools.tiny_models import ensure_tiny_models

    teacher_model = ensure_tiny_models().teacher
    record = bool(selected & {"P1", "P2", "P4"})
    p2_sequences = demo_sequences(args.p2_positions) if record else []
    p3_sequences = demo_sequences(args.p3_positions) if "P3" in selected else []
    data = TeacherData()
    teacher_measured = sorted(selected & {"P1", "P2", "P3", "P4"})
    peer_measured = sorted(selected & {"P1", "P2", "P3"})

    def with_our_server():
        overrides = [f"engine.model={teacher_model}"]
        with TeacherProcess(TEACHER_CPU_CONFIG, overrides, log_path=out / "teacher.log") as teacher:
            if record:
                record_pass(teacher.address, p2_sequences, data)
            if "P4" in selected:
                report.measure(["P4"], lambda: {"P4": _p4(out, args, teacher.address, p2_sequences, data)})
            if peer_measured:
                report.measure(
                    peer_measured,
                    lambda: (
                        peer_passes(
                            out,
                            teacher_model,
                            teacher.address,
                            p2_sequences,
                            p3_sequences,
                            data,
                            args.repeats,
                            record=bool(selected & {"P1", "P2"}),
                            p3="P3" in selected,
                        )
                        or {}
                    ),
                    "vllm serve + in-process",
                )
        return {}

    report.measure(teacher_measured, with_our_server, "our teacher server")
    if "P3" in selected:
        report.measure(["P3"], lambda: {"P3": p3(data, sum(len(s) - 1 for s in p3_sequences))})
    if "P1" in selected:
        report.measure(["P1"], lambda: {"P1": p1(data)})
    if "P2" in selected:
        report.measure(["P2"], lambda: {"P2": p2(data, p2_sequences, args.repeats)})


def _p4(out: Path, args, address: str, p2_sequences, data: TeacherData) -> dict:
    from tests.bench import bench_trainer

    records = bench_trainer.record_for_replay(out, address, p2_sequences, data.recorded)
    alone = data.recorded.positions / data.recorded.seconds
    return bench_trainer.run(out, args.p4_steps, address, alone, records)
