"""The reduced `make chaos` (tests/chaos/run.py): R1 bad input, R4 load, R5 SIGTERM under load,
against real teacher servers (the transformers engine, for a fast start)."""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.bad_input import format_bad_input, run_bad_input
from tests.chaos.load import run_load, run_sigterm_under_load, server_internal_errors, server_requests
from tests.chaos.run import GRACE_SECONDS, r4_ok, r5_ok, teacher


@pytest.fixture(scope="module")
def chaos_teacher(tmp_path_factory, tiny_models):
    with teacher("hf", tmp_path_factory.mktemp("chaos"), "teacher") as server:
        yield server


def test_r1_every_bad_request_gets_its_documented_status(chaos_teacher):
    result = asyncio.run(run_bad_input(chaos_teacher.address, total=126, seed=1))
    table = format_bad_input(result)
    assert all(o.sent >= 6 and o.expected + o.masked == o.sent for o in result["outcomes"].values()), table
    assert server_internal_errors(chaos_teacher.metrics_url) == 0
    assert result["reference_identical"], table
    assert chaos_teacher.proc.poll() is None


def test_r4_load_below_and_far_above_the_admission_limit(chaos_teacher):
    result = asyncio.run(run_load(chaos_teacher.address, chaos_teacher.proc.pid, streams=4, per_stream=6, seed=2))
    assert r4_ok(result), result
    # The server's own count: grpc.aio's client may mask the status it sent (grpc/grpc#36066).
    assert server_requests(chaos_teacher.metrics_url, "RESOURCE_EXHAUSTED") > 0
    assert server_internal_errors(chaos_teacher.metrics_url) == 0
    assert chaos_teacher.proc.poll() is None


def test_r5_sigterm_under_load_drains_and_exits_0(tmp_path):
    server = teacher("hf", tmp_path, "sigterm").start()
    try:
        server.wait_serving()
        result = asyncio.run(run_sigterm_under_load(server.address, server.proc, GRACE_SECONDS, streams=3, seed=3))
    finally:
        server.stop()
    assert r5_ok(result), result
