"""Run the teacher service as a child process (demo, tests, benchmarks) and stop it cleanly."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherProcess:
    """``python -m hyperdistill.teacher_service`` on free loopback ports; ``with`` waits for SERVING and stops it."""

    def __init__(
        self,
        config: str | Path,
        overrides: list[str] = (),
        log_path: str | Path | None = None,
        startup_timeout: float = 300.0,
        port: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        env: Mapping[str, str] | None = None,
    ):
        """``port``: the gRPC port to bind (default: a free one), e.g. to restart a teacher in place.
        ``credentials``: of the health checks, for a teacher with TLS on (default: plaintext).
        ``env``: variables set for the child on top of this process's environment (e.g. ``OMP_NUM_THREADS``)."""
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.command = [
            sys.executable,
            "-m",
            "hyperdistill.teacher_service",
            "--config",
            str(config),
            f"server.port={self.port}",
            f"server.metrics_port={self.metrics_port}",
            *overrides,
        ]
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.credentials = credentials
        self.env = dict(env or {})

    def start(self) -> TeacherProcess:
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            **self.env,
        }
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_serving(self) -> None:
        """Block until health is SERVING; raises with the log's tail if the process dies or times out."""
        deadline = time.monotonic() + self.startup_timeout
        channel = (
            grpc.insecure_channel(self.address)
            if self.credentials is None
            else grpc.secure_channel(self.address, self.credentials)
        )
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"teacher exited with {self.proc.returncode} while starting{self._tail()}")
                with contextlib.suppress(grpc.RpcError):  # not listening yet, or busy
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.5)
        raise TimeoutError(f"teacher not SERVING at {self.address} after {self.startup_timeout:.0f} s{self._tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL past ``timeout``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("teacher did not exit %.0f s after SIGTERM; killing it", timeout)
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> TeacherProcess:
        self.start()
        try:
            self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n--- teacher log tail ---\n" + "\n".join(self.log_path.read_text().splitlines()[-lines:])
