"""The GPU layout of the node, and the checks that keep the deploy files equal to it.

``deploy/cluster.yaml`` is the only place that says which GPUs the teacher and the trainer get.
With the two production configs it fixes everything the deploy files repeat for their tools: the
teacher's ``tensor_parallel_size`` equals its GPU count, the trainer runs one torchrun rank per
GPU, rank r serves ``/metrics`` on ``metrics.port + r``. ``check_compose`` and
``check_prometheus`` prove that ``deploy/compose.yaml`` and ``deploy/prometheus/prometheus.yml``
say the same; they take parsed YAML, so a test can also feed them ``docker compose config``.

    python -m hyperdistill.common.cluster check   # layout + configs + compose + Prometheus targets
    python -m hyperdistill.common.cluster show    # the derived values, one KEY=VALUE a line
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hyperdistill.common.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "deploy/cluster.yaml"
COMPOSE = ROOT / "deploy/compose.yaml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
# Compose service names, which are also the services' host names on the compose network.
TEACHER, TRAINER = "teacher", "trainer"
ANY_ADDRESS = "0.0.0.0"


@dataclass(kw_only=True)
class ServiceLayout:
    gpus: list[int]
    """GPU indices on the node (``nvidia-smi`` order) that this service, and only it, gets."""
    config: str
    """The service's production config, relative to the repository root."""


@dataclass(kw_only=True)
class ClusterLayout:
    gpus_per_node: int = 8
    """GPUs on the node."""
    teacher: ServiceLayout
    """The teacher service: one vLLM engine, tensor-parallel over these GPUs."""
    trainer: ServiceLayout
    """The trainer: ``torchrun --nproc_per_node len(gpus)``, FSDP2 over these GPUs."""

    def __post_init__(self) -> None:
        for name in (TEACHER, TRAINER):
            gpus = getattr(self, name).gpus
            if not gpus or len(set(gpus)) != len(gpus) or not all(0 <= g < self.gpus_per_node for g in gpus):
                raise ConfigError(f"{name}.gpus must be distinct indices in [0, {self.gpus_per_node}), got {gpus}")
        shared = sorted(set(self.teacher.gpus) & set(self.trainer.gpus))
        if shared:
            raise ConfigError(f"GPUs {shared} are given to both the teacher and the trainer")


@dataclass(frozen=True)
class Deployment:
    """What the layout and the two production configs imply for compose and Prometheus."""

    teacher_gpus: tuple[int, ...]
    teacher_config: str
    teacher_grpc_port: int
    teacher_metrics_port: int
    teacher_grace_seconds: float
    trainer_gpus: tuple[int, ...]
    trainer_config: str
    trainer_metrics_ports: tuple[int, ...]

    @property
    def nproc_per_node(self) -> int:
        return len(self.trainer_gpus)

    def as_env(self) -> dict[str, str]:
        def join(values):
            return ",".join(map(str, values))

        return {
            "TEACHER_GPUS": join(self.teacher_gpus),
            "TEACHER_TENSOR_PARALLEL_SIZE": str(len(self.teacher_gpus)),
            "TEACHER_GRPC_PORT": str(self.teacher_grpc_port),
            "TEACHER_METRICS_PORT": str(self.teacher_metrics_port),
            "TRAINER_GPUS": join(self.trainer_gpus),
            "TRAINER_NPROC_PER_NODE": str(self.nproc_per_node),
            "TRAINER_METRICS_PORTS": join(self.trainer_metrics_ports),
        }


def load_deployment(layout_path: str | Path = LAYOUT) -> Deployment:
    """Load the layout and both production configs; ConfigError names every disagreement."""
    from hyperdistill.teacher_service.config import TeacherConfig
    from hyperdistill.trainer.config import TrainerConfig  # imports torch: only when a layout is checked

    layout = load_config(ClusterLayout, layout_path)
    teacher = load_config(TeacherConfig, ROOT / layout.teacher.config)
    trainer = load_config(TrainerConfig, ROOT / layout.trainer.config)
    ranks = len(layout.trainer.gpus)
    trainer_ports = tuple(trainer.metrics.port + rank for rank in range(ranks))
    problems = []
    if teacher.engine.tensor_parallel_size != len(layout.teacher.gpus):
        problems.append(
            f"{layout.teacher.config}: engine.tensor_parallel_size is {teacher.engine.tensor_parallel_size}, "
            f"the layout gives the teacher {len(layout.teacher.gpus)} GPUs"
        )
    address = f"{TEACHER}:{teacher.server.port}"
    if address not in trainer.teacher.addresses:
        problems.append(f"{layout.trainer.config}: teacher.addresses {trainer.teacher.addresses} lacks {address}")
    for where, host in (
        (f"{layout.teacher.config}: server.host", teacher.server.host),
        (f"{layout.teacher.config}: server.metrics_host", teacher.server.metrics_host),
        (f"{layout.trainer.config}: metrics.host", trainer.metrics.host),
    ):
        if host != ANY_ADDRESS:
            problems.append(f"{where} is {host}: other containers cannot reach it (use {ANY_ADDRESS})")
    if not trainer.metrics.port:
        problems.append(f"{layout.trainer.config}: metrics.port is 0, so no rank can be scraped")
    published = [teacher.server.port, teacher.server.metrics_port, *trainer_ports]
    if len(set(published)) != len(published):
        problems.append(f"published ports collide on the node: {published}")
    if problems:
        raise ConfigError("; ".join(problems))
    return Deployment(
        teacher_gpus=tuple(layout.teacher.gpus),
        teacher_config=layout.teacher.config,
        teacher_grpc_port=teacher.server.port,
        teacher_metrics_port=teacher.server.metrics_port,
        teacher_grace_seconds=teacher.server.grace_seconds,
        trainer_gpus=tuple(layout.trainer.gpus),
        trainer_config=layout.trainer.config,
        trainer_metrics_ports=trainer_ports,
    )


def check_compose(deployment: Deployment, compose: dict[str, Any]) -> list[str]:
    """Disagreements between a parsed compose file and ``deployment`` (empty when they agree)."""
    services = compose.get("services") or {}
    missing = [name for name in (TEACHER, TRAINER) if name not in services]
    if missing:
        return [f"compose: no service {name!r}" for name in missing]
    teacher, trainer = services[TEACHER], services[TRAINER]
    problems = []
    for name, service, gpus, config in (
        (TEACHER, teacher, deployment.teacher_gpus, deployment.teacher_config),
        (TRAINER, trainer, deployment.trainer_gpus, deployment.trainer_config),
    ):
        reserved = _device_ids(service)
        if reserved != sorted(gpus):
            problems.append(f"compose: {name} reserves GPUs {reserved}, the layout gives it {sorted(gpus)}")
        if _flag(service, "--config") != config:
            problems.append(f"compose: {name} is not started with --config {config}")
    if _flag(trainer, "--nproc_per_node") != str(deployment.nproc_per_node):
        problems.append(f"compose: trainer must run torchrun --nproc_per_node {deployment.nproc_per_node}")
    if f"127.0.0.1:{deployment.teacher_grpc_port}" not in _healthcheck(teacher):
        problems.append(f"compose: the teacher's health check does not ask 127.0.0.1:{deployment.teacher_grpc_port}")
    ports = deployment.trainer_metrics_ports
    if f"range({ports[0]}, {ports[-1] + 1})" not in _healthcheck(trainer):
        problems.append(
            f"compose: the trainer's health check must scrape every rank, range({ports[0]}, {ports[-1] + 1})"
        )
    if (trainer.get("depends_on") or {}).get(TEACHER, {}).get("condition") != "service_healthy":
        problems.append("compose: the trainer must depend on the teacher with condition service_healthy")
    if _seconds(teacher.get("stop_grace_period", "10s")) <= deployment.teacher_grace_seconds:
        problems.append(
            f"compose: the teacher's stop_grace_period must exceed server.grace_seconds "
            f"({deployment.teacher_grace_seconds:.0f} s), or Docker kills it mid-drain"
        )
    return problems


def check_prometheus(deployment: Deployment, prometheus: dict[str, Any]) -> list[str]:
    """Disagreements between a parsed ``prometheus.yml`` and ``deployment``'s metrics endpoints."""
    jobs = {
        job["job_name"]: sorted(
            target for static in job.get("static_configs", []) for target in static.get("targets", [])
        )
        for job in prometheus.get("scrape_configs") or []
    }
    expected = {
        TEACHER: [f"{TEACHER}:{deployment.teacher_metrics_port}"],
        TRAINER: sorted(f"{TRAINER}:{port}" for port in deployment.trainer_metrics_ports),
    }
    return [
        f"prometheus: job {job!r} scrapes {jobs.get(job)}, expected {targets}"
        for job, targets in expected.items()
        if jobs.get(job) != targets
    ]


def _device_ids(service: dict[str, Any]) -> list[int]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return sorted(
        int(i) for device in devices if device.get("driver") == "nvidia" for i in device.get("device_ids", [])
    )


def _flag(service: dict[str, Any], name: str) -> str | None:
    command = service.get("command") or []
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return words[words.index(name) + 1] if name in words[:-1] else None


def _healthcheck(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(test)


def _seconds(duration: str | int | float) -> float:
    """Compose durations: ``90s``, ``2m30s``, ``1h`` (a bare number is seconds)."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration.strip())
    if not parts or not duration.strip():
        raise ConfigError(f"cannot read the duration {duration!r}")
    hours, minutes, seconds = (float(p or 0) for p in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _load_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Check the node's GPU layout against the service configs, "
        "the compose file and Prometheus, or print the derived values."
    )
    parser.add_argument(
        "command",
        choices=("check", "show"),
        help="check: exit 1 naming every disagreement; show: print KEY=VALUE lines",
    )
    parser.add_argument("--layout", type=Path, default=LAYOUT, help="the layout YAML (default: deploy/cluster.yaml)")
    parser.add_argument("--compose", type=Path, default=COMPOSE, help="the compose file to check")
    parser.add_argument("--prometheus", type=Path, default=PROMETHEUS, help="the Prometheus config to check")
    args = parser.parse_args()
    try:
        deployment = load_deployment(args.layout)
    except ConfigError as e:
        sys.exit(f"{args.layout}: {e}")
    if args.command == "show":
        for key, value in deployment.as_env().items():
            print(f"{key}={value}")
        return
    problems = check_compose(deployment, _load_yaml(args.compose)) + check_prometheus(
        deployment, _load_yaml(args.prometheus)
    )
    if problems:
        sys.exit("\n".join(problems))
    env = deployment.as_env()
    print(
        f"ok: teacher GPUs {env['TEACHER_GPUS']} (TP={env['TEACHER_TENSOR_PARALLEL_SIZE']}), trainer GPUs "
        f"{env['TRAINER_GPUS']} (torchrun x{env['TRAINER_NPROC_PER_NODE']}), metrics ports "
        f"{env['TEACHER_METRICS_PORT']} and {env['TRAINER_METRICS_PORTS']}"
    )


if __name__ == "__main__":
    main()
