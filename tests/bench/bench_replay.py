"""A teacher that answers from recorded ScoreChunks (P4's "precomputed answers" run).

It implements the same ``TeacherService`` proto (``common/stubs``) plus health: ``GetInfo``
returns the recorded teacher's info, and ``Score`` answers each request with the chunks the
real teacher sent for the same token ids and K, re-labelled with the request's id. It computes
nothing, so the trainer's step time is measured without the teacher's compute competing for
the two cores. An unrecorded sequence ends the stream with NOT_FOUND (the run then fails
loudly rather than measure something else).

Records: a pickle of ``{"info": TeacherInfo bytes, "chunks": {key: [ScoreChunk bytes]}}`` with
``key = record_key(token_ids bytes, top_k)``, written by ``save_records``.

Child: ``python -m tests.bench.bench_replay --records rec.pkl --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc
from tests.bench.bench_common import ROOT

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def record_key(token_ids: bytes, top_k: int) -> str:
    return hashlib.sha256(token_ids + top_k.to_bytes(4, "little")).hexdigest()


def save_records(path: Path, info: pb.TeacherInfo, sequences, chunks, top_k: int) -> None:
    """sequences: int32 [T_i] each; chunks: the ScoreChunks the teacher sent for each."""
    from hyperdistill.common.codec import pack_token_ids

    records = {
        record_key(pack_token_ids(ids), top_k): [c.SerializeToString() for c in per_seq]
        for ids, per_seq in zip(sequences, chunks, strict=True)
    }
    path.write_bytes(pickle.dumps({"info": info.SerializeToString(), "chunks": records}))


class ReplayServicer(pb_grpc.TeacherServiceServicer):
    def __init__(self, info: pb.TeacherInfo, chunks: dict[str, list[bytes]]):
        self._info = info
        self._chunks = chunks

    async def GetInfo(self, request, context):
        return self._info

    async def Score(self, request_iterator, context):
        async for request in request_iterator:
            recorded = self._chunks.get(record_key(request.token_ids, request.top_k))
            if recorded is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"request {request.request_id!r}: sequence not recorded for the replay"
                )
            for data in recorded:
                chunk = pb.ScoreChunk.FromString(data)
                chunk.request_id = request.request_id
                yield chunk


async def serve(records: Path, port: int) -> None:
    data = pickle.loads(records.read_bytes())
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_TeacherServiceServicer_to_server(
        ReplayServicer(pb.TeacherInfo.FromString(data["info"]), data["chunks"]), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


class ReplayProcess:
    """The replay server as a child on ``port``; ``with`` waits for health SERVING and stops it."""

    def __init__(self, records: Path, port: int, log_path: Path, startup_timeout: float = 120):
        self.address = f"127.0.0.1:{port}"
        self.command = [
            sys.executable,
            "-m",
            "tests.bench.bench_replay",
            "--records",
            str(records),
            "--port",
            str(port),
        ]
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ReplayProcess:
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
        deadline = time.monotonic() + self.startup_timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"replay teacher did not start; log: {self.log_path}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay recorded teacher answers over the teacher proto.")
    parser.add_argument("--records", required=True, type=Path, help="records pickle (save_records)")
    parser.add_argument("--port", required=True, type=int, help="loopback port to bind")
    args = parser.parse_args()
    asyncio.run(serve(args.records, args.port))


if __name__ == "__main__":
    main()
