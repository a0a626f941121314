"""The GPU layout of the node, and the checks that keep the deploy files equal to it.

``deploy/cluster.yaml`` is the only place that says which GPUs the teacher and the trainer get.
With the two production configs it fixes everything the deploy files repeat for their tools: the
teacher's ``tensor_parallel_size`` equals its GPU count, the trainer runs one torchrun rank per
GPU, rank r serves ``/metrics`` on ``metrics.port + r``. ``check_compose`` and
``check_prometheus`` prove that ``deploy/compose.yaml`` and ``deploy/prometheus/prometheus.yml``
say the same; they take parsed YAML, so a test can also feed them ``docker compose config``.

Its ``cache:`` section is the phase that trains from the teacher top-K cache: compose's
``precompute`` (no GPU) fills ``cache.dir`` through the teacher service, then ``trainer-all``
trains on ``cache.trainer_gpus`` (all of them) from the cache alone, with the teacher stopped.
Services whose GPUs overlap must never start together: they share no compose profile and neither
depends on the other; every GPU service has a profile (one without runs with every profile).

    python -m tests.devtools.cluster check   # layout + configs + compose + Prometheus targets
    python -m tests.devtools.cluster show    # the derived values, one KEY=VALUE a line
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hyperdistill.common.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = ROOT / "deploy/cluster.yaml"
COMPOSE = ROOT / "deploy/compose.yaml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
# Compose service names, which are also the services' host names on the compose network.
TEACHER, TRAINER = "teacher", "trainer"
# The teacher-cache phase: precompute fills the cache, trainer-all trains on every GPU from it.
PRECOMPUTE, TRAINER_ALL = "precompute", "trainer-all"
PRECOMPUTE_MODULE = "hyperdistill.trainer.precompute"
ANY_ADDRESS = "0.0.0.0"


@dataclass(kw_only=True)
class ServiceLayout:
    gpus: list[int]
    """GPU indices on the node (``nvidia-smi`` order) that this service, and only it, gets."""
    config: str
    """The service's production config, relative to the repository root."""


@dataclass(kw_only=True)
class CacheLayout:
    dir: str
    """The teacher top-K cache in the containers: ``teacher.cache.dir`` of precompute and trainer-all."""
    precompute_metrics_port: int = 9409
    """``precompute --metrics-port``: its progress (``precompute_remaining_positions``, ETA)."""
    trainer_gpus: list[int]
    """GPUs of ``trainer-all`` (``torchrun --nproc_per_node len(trainer_gpus)``), which trains from
    the cache alone while the teacher is stopped: they may be the teacher's."""


@dataclass(kw_only=True)
class ClusterLayout:
    gpus_per_node: int = 8
    """GPUs on the node."""
    teacher: ServiceLayout
    """The teacher service: one vLLM engine, tensor-parallel over these GPUs."""
    trainer: ServiceLayout
    """The trainer: ``torchrun --nproc_per_node len(gpus)``, FSDP2 over these GPUs."""
    cache: CacheLayout | None = None
    """The teacher-cache phase (precompute, then trainer-all); unset: no such services."""

    def __post_init__(self) -> None:
        groups = [(name, getattr(self, name).gpus) for name in (TEACHER, TRAINER)]
        if self.cache is not None:
            groups.append(("cache.trainer_gpus", self.cache.trainer_gpus))
        for name, gpus in groups:
            if not gpus or len(set(gpus)) != len(gpus) or not all(0 <= g < self.gpus_per_node for g in gpus):
                name = name if "." in name else f"{name}.gpus"
                raise ConfigError(f"{name} must be distinct indices in [0, {self.gpus_per_node}), got {gpus}")
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
    teacher_model: str = ""
    """The teacher config's ``engine.model``: the name its GetInfo reports, the cache's key."""
    cache_dir: str | None = None
    """The teacher-cache phase (layout ``cache:``); None: none configured."""
    precompute_metrics_port: int | None = None
    cache_trainer_gpus: tuple[int, ...] = ()
    cache_trainer_metrics_ports: tuple[int, ...] = ()

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
            "TEACHER_MODEL": self.teacher_model,
        } | (
            {
                "CACHE_DIR": self.cache_dir,
                "PRECOMPUTE_METRICS_PORT": str(self.precompute_metrics_port),
                "CACHE_TRAINER_GPUS": join(self.cache_trainer_gpus),
                "CACHE_TRAINER_NPROC_PER_NODE": str(len(self.cache_trainer_gpus)),
                "CACHE_TRAINER_METRICS_PORTS": join(self.cache_trainer_metrics_ports),
            }
            if self.cache_dir is not None
            else {}
        )


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
    cache = layout.cache
    cache_ports: tuple[int, ...] = ()
    if cache is not None:
        cache_ports = tuple(trainer.metrics.port + rank for rank in range(len(cache.trainer_gpus)))
        if not cache.dir.startswith("/"):
            problems.append(f"cache.dir must be an absolute path in the containers, got {cache.dir!r}")
        # precompute runs beside the teacher and the live trainer; trainer-all replaces both.
        if not 0 < cache.precompute_metrics_port < 65536 or cache.precompute_metrics_port in (*published, *cache_ports):
            problems.append(
                f"cache.precompute_metrics_port {cache.precompute_metrics_port} collides with the published "
                f"ports {sorted({*published, *cache_ports})} (or is not a port)"
            )
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
        teacher_model=teacher.engine.model,
        cache_dir=cache.dir if cache else None,
        precompute_metrics_port=cache.precompute_metrics_port if cache else None,
        cache_trainer_gpus=tuple(cache.trainer_gpus) if cache else (),
        cache_trainer_metrics_ports=cache_ports,
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
    if deployment.cache_dir is not None:
        problems += _check_cache_services(deployment, services)
    return problems + _check_gpu_profiles(services)


def _check_cache_services(deployment: Deployment, services: dict[str, Any]) -> list[str]:
    """precompute and trainer-all against the layout's ``cache:`` and the production configs."""
    missing = [name for name in (PRECOMPUTE, TRAINER_ALL) if name not in services]
    if missing:
        return [f"compose: no service {name!r} (the layout has a cache: section)" for name in missing]
    precompute, full = services[PRECOMPUTE], services[TRAINER_ALL]
    problems = []
    if reserved := _device_ids(precompute):
        problems.append(f"compose: precompute reserves GPUs {reserved}: it needs none (the teacher service scores)")
    if _module(precompute) != PRECOMPUTE_MODULE:
        problems.append(f"compose: precompute must run python -m {PRECOMPUTE_MODULE}")
    if _flag(precompute, "--metrics-port") != str(deployment.precompute_metrics_port):
        problems.append(f"compose: precompute must serve --metrics-port {deployment.precompute_metrics_port}")
    if (_depends_on(precompute).get(TEACHER) or {}).get("condition") != "service_healthy":
        problems.append("compose: precompute must depend on the teacher with condition service_healthy")
    gpus = deployment.cache_trainer_gpus
    if (reserved := _device_ids(full)) != sorted(gpus):
        problems.append(f"compose: {TRAINER_ALL} reserves GPUs {reserved}, the layout gives it {sorted(gpus)}")
    if _flag(full, "--nproc_per_node") != str(len(gpus)):
        problems.append(f"compose: {TRAINER_ALL} must run torchrun --nproc_per_node {len(gpus)}")
    if _module(full) != "hyperdistill.trainer":
        problems.append(f"compose: {TRAINER_ALL} must run -m hyperdistill.trainer")
    ports = deployment.cache_trainer_metrics_ports
    if f"range({ports[0]}, {ports[-1] + 1})" not in _healthcheck(full):
        problems.append(
            f"compose: {TRAINER_ALL}'s health check must scrape every rank, range({ports[0]}, {ports[-1] + 1})"
        )
    configs = {}
    for name in (TRAINER, PRECOMPUTE, TRAINER_ALL):
        if _flag(services[name], "--config") != deployment.trainer_config:
            problems.append(f"compose: {name} is not started with --config {deployment.trainer_config}")
        try:
            configs[name] = _effective_config(services[name])
        except (ConfigError, ValueError) as e:
            problems.append(f"compose: {name}'s config with its command-line overrides does not load: {e}")
    if len(configs) < 3:
        return problems
    live, pre, cached = configs[TRAINER], configs[PRECOMPUTE], configs[TRAINER_ALL]
    if pre.teacher.cache.dir != deployment.cache_dir:
        problems.append(
            f"compose: precompute fills teacher.cache.dir={pre.teacher.cache.dir}, "
            f"the layout's is {deployment.cache_dir}"
        )
    if f"{TEACHER}:{deployment.teacher_grpc_port}" not in pre.teacher.addresses:
        problems.append(
            f"compose: precompute's teacher.addresses {pre.teacher.addresses} lacks "
            f"{TEACHER}:{deployment.teacher_grpc_port}"
        )
    if cached.teacher.addresses:
        problems.append(
            f"compose: {TRAINER_ALL} must train from the cache alone (teacher.addresses=[]), not from "
            f"{cached.teacher.addresses}: the teacher is stopped while it runs"
        )
    if cached.teacher.cache.dir != deployment.cache_dir:
        problems.append(
            f"compose: {TRAINER_ALL} reads teacher.cache.dir={cached.teacher.cache.dir}, "
            f"the layout's is {deployment.cache_dir}"
        )
    for name, config in ((PRECOMPUTE, pre), (TRAINER_ALL, cached)):
        model = config.teacher.cache.teacher_model
        if (model is not None or name == TRAINER_ALL) and model != deployment.teacher_model:
            problems.append(
                f"compose: {name}'s teacher.cache.teacher_model is {model!r}, the teacher config's engine.model is "
                f"{deployment.teacher_model!r}: the cache's key would not match"
            )
    # What makes the cache's key, and which sequences precompute scored: trainer-all must agree.
    for field in (
        "student.path",
        "student.chat_template",
        "teacher.top_k",
        "teacher.cache.encoding",
        "teacher.cache.teacher_revision",
        "data",
        "phases",
        "eval.held_out",
    ):
        if _get(pre, field) != _get(cached, field):
            problems.append(
                f"compose: precompute and {TRAINER_ALL} differ in {field} ({_get(pre, field)!r} vs "
                f"{_get(cached, field)!r}): {TRAINER_ALL} would find its cache refused or sequences missing"
            )
    actual = tuple(cached.metrics.port + rank for rank in range(len(gpus)))
    if actual != ports:
        problems.append(
            f"compose: {TRAINER_ALL}'s ranks serve /metrics on {list(actual)}, the layout's are {list(ports)}"
        )
    if cached.checkpoint.dir == live.checkpoint.dir:
        problems.append(
            f"compose: {TRAINER_ALL} must not share checkpoint.dir {live.checkpoint.dir} with the trainer: a "
            f"checkpoint resumes only at the world size that wrote it "
            f"({deployment.nproc_per_node} vs {len(gpus)} ranks)"
        )
    live_batch = live.optim.accumulation_steps * deployment.nproc_per_node
    if cached.optim.accumulation_steps * len(gpus) != live_batch:
        problems.append(
            f"compose: {TRAINER_ALL}'s global batch (optim.accumulation_steps {cached.optim.accumulation_steps} x "
            f"{len(gpus)} ranks) differs from the trainer's "
            f"({live.optim.accumulation_steps} x {deployment.nproc_per_node})"
        )
    return problems


def _check_gpu_profiles(services: dict[str, Any]) -> list[str]:
    """No two services that reserve a common GPU can start together; a service's dependencies start with it."""
    problems = []
    for name, service in services.items():
        mine = set(_profiles(service))
        for dependency in _depends_on(service):
            theirs = set(_profiles(services.get(dependency) or {}))
            if theirs and not (mine and mine <= theirs):
                problems.append(
                    f"compose: {name} (profiles {sorted(mine)}) depends on {dependency}, which is not in every "
                    f"one of them (its profiles: {sorted(theirs)})"
                )
    gpus = {name: set(_device_ids(service)) for name, service in services.items() if _device_ids(service)}
    for a, b in itertools.combinations(sorted(gpus), 2):
        shared = sorted(gpus[a] & gpus[b])
        if not shared:
            continue
        pa, pb = set(_profiles(services[a])), set(_profiles(services[b]))
        if not pa or not pb:
            problems.append(
                f"compose: {a} and {b} both reserve GPUs {shared} and {a if not pa else b} has no profile, "
                f"so it starts with every profile"
            )
        elif pa & pb:
            problems.append(
                f"compose: {a} and {b} both reserve GPUs {shared} and share the profile(s) {sorted(pa & pb)}"
            )
        if b in _dependencies(services, a) or a in _dependencies(services, b):
            problems.append(f"compose: {a} and {b} both reserve GPUs {shared} but one depends on the other")
    return problems


def check_prometheus(deployment: Deployment, prometheus: dict[str, Any]) -> list[str]:
    """Disagreements between a parsed ``prometheus.yml`` and ``deployment``'s metrics endpoints.

    The services of the teacher-cache phase (precompute, trainer-all) run only in their profile, so
    they are found by DNS (``dns_sd_configs``, type A, one entry per port): while they do not run
    they have no targets, instead of targets that are down (and would fire ``TrainerDown``)."""
    configs = {job["job_name"]: job for job in prometheus.get("scrape_configs") or []}
    static = {name: sorted(_static_targets(job)) for name, job in configs.items()}
    discovered = {name: sorted(_dns_targets(job)) for name, job in configs.items()}
    expected_static = {
        TEACHER: [f"{TEACHER}:{deployment.teacher_metrics_port}"],
        TRAINER: sorted(f"{TRAINER}:{port}" for port in deployment.trainer_metrics_ports),
    }
    expected_dns: dict[str, list[str]] = {}
    if deployment.cache_dir is not None:
        # trainer-all's ranks join the trainer job: its dashboard and alerts cover them.
        expected_dns[TRAINER] = sorted(f"{TRAINER_ALL}:{port}" for port in deployment.cache_trainer_metrics_ports)
        expected_dns[PRECOMPUTE] = [f"{PRECOMPUTE}:{deployment.precompute_metrics_port}"]
    problems = []
    for job in sorted({*expected_static, *expected_dns}):
        want_static, want_dns = expected_static.get(job, []), expected_dns.get(job, [])
        if static.get(job, []) != want_static or discovered.get(job, []) != want_dns or job not in configs:
            problems.append(
                f"prometheus: job {job!r} scrapes {static.get(job)} (static) and {discovered.get(job)} (DNS), "
                f"expected {want_static} (static) and {want_dns} (DNS)"
            )
        elif want_dns and not _names_dns_instances(configs[job]):
            problems.append(
                f"prometheus: job {job!r} must relabel its DNS targets' instance to name:port "
                f"(source_labels [__meta_dns_name, __address__]), not the container's IP"
            )
    return problems


def _static_targets(job: dict[str, Any]) -> list[str]:
    return [target for static in job.get("static_configs") or [] for target in static.get("targets") or []]


def _dns_targets(job: dict[str, Any]) -> list[str]:
    return [
        f"{name}:{sd.get('port')}"
        for sd in job.get("dns_sd_configs") or []
        if sd.get("type") == "A"
        for name in sd.get("names") or []
    ]


def _names_dns_instances(job: dict[str, Any]) -> bool:
    return any(
        rule.get("target_label") == "instance" and rule.get("source_labels") == ["__meta_dns_name", "__address__"]
        for rule in job.get("relabel_configs") or []
    )


def _device_ids(service: dict[str, Any]) -> list[int]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return sorted(
        int(i) for device in devices if device.get("driver") == "nvidia" for i in device.get("device_ids", [])
    )


def _words(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def _flag(service: dict[str, Any], name: str) -> str | None:
    words = _words(service)
    return words[words.index(name) + 1] if name in words[:-1] else None


def _module(service: dict[str, Any]) -> str | None:
    """The module of ``python -m MODULE`` / ``torchrun ... -m MODULE``."""
    return _flag(service, "-m")


def _effective_config(service: dict[str, Any]):
    """The trainer config a service runs: ``--config`` with the command's ``key=value`` overrides."""
    from hyperdistill.trainer.config import TrainerConfig

    words = _words(service)
    config = _flag(service, "--config")
    if config is None:
        raise ConfigError("no --config")
    after = words[words.index("--config") + 2 :]
    overrides = [w for w in after if "=" in w and not w.startswith("-")]
    return load_config(TrainerConfig, ROOT / config, overrides)


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _profiles(service: dict[str, Any]) -> list[str]:
    return list(service.get("profiles") or [])


def _depends_on(service: dict[str, Any]) -> dict[str, dict]:
    """``depends_on`` as a mapping (the short form is a list of names)."""
    depends = service.get("depends_on") or {}
    return {name: {} for name in depends} if isinstance(depends, list) else {k: v or {} for k, v in depends.items()}


def _dependencies(services: dict[str, Any], name: str) -> set[str]:
    """Every service ``name`` starts with through ``depends_on``, transitively."""
    found, todo = set(), [name]
    while todo:
        for dependency in _depends_on(services.get(todo.pop()) or {}):
            if dependency not in found:
                found.add(dependency)
                todo.append(dependency)
    return found


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
    cache = (
        f"; cache phase: precompute (no GPU, metrics port {env['PRECOMPUTE_METRICS_PORT']}) into "
        f"{env['CACHE_DIR']}, then {TRAINER_ALL} GPUs {env['CACHE_TRAINER_GPUS']} (torchrun "
        f"x{env['CACHE_TRAINER_NPROC_PER_NODE']}, teacher {env['TEACHER_MODEL']} from the cache alone), "
        f"metrics ports {env['CACHE_TRAINER_METRICS_PORTS']}"
        if deployment.cache_dir is not None
        else ""
    )
    print(
        f"ok: teacher GPUs {env['TEACHER_GPUS']} (TP={env['TEACHER_TENSOR_PARALLEL_SIZE']}), trainer GPUs "
        f"{env['TRAINER_GPUS']} (torchrun x{env['TRAINER_NPROC_PER_NODE']}), metrics ports "
        f"{env['TEACHER_METRICS_PORT']} and {env['TRAINER_METRICS_PORTS']}{cache}"
    )


if __name__ == "__main__":
    main()
