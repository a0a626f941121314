"""R6 security: TLS, mutual TLS and a bearer token on the teacher's gRPC port (issue 11).

One real teacher (transformers engine) serves the whole module with mutual TLS and a token, on
certificates made here by running the openssl commands of deploy/README.md ("Security"). Checked: the
trainer's production client scores over it; calls without the token, with a wrong one, without a
client certificate or in plaintext are refused with the documented status; health and reflection
answer without a token (the real grpcurl, and compose's health check with its TLS flags); config
errors name their field. Also: checkpoints load weights_only and the wire carries no pickles.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperdistill.common.codec import pack_token_ids
from hyperdistill.common.config import config_from_dict, load_config
from hyperdistill.common.stubs import teacher_pb2 as pb
from hyperdistill.common.stubs import teacher_pb2_grpc as pb_grpc
from hyperdistill.common.tokenizer import load_tokenizer, tokenizer_fingerprint
from hyperdistill.teacher_service.config import ServerConfig, TeacherConfig
from hyperdistill.teacher_service.server import serve
from hyperdistill.trainer.checkpoint import CheckpointConfig, Checkpointer
from hyperdistill.trainer.teacher_client import (
    TeacherClient,
    TeacherClientConfig,
    TeacherRequestError,
    TeacherUnavailableError,
)
from tests.conftest import ROOT, TEACHER_CPU_CONFIG
from tests.devtools.teacher_process import TeacherProcess
from tests.helpers import VOCAB, assert_matches_reference, random_ids

TOKEN_ENV = "HYPERDISTILL_TEST_TEACHER_TOKEN"
TOKEN = secrets.token_hex(16)
MISSING = "missing 'authorization: Bearer <token>' metadata"
INVALID = "the bearer token in the 'authorization' metadata is not valid"
MALFORMED = "the 'authorization' metadata must be exactly one 'Bearer <token>'"
TOP_K = 4


@dataclass(frozen=True)
class Certs:
    """Paths of the PEM files ``make_certs`` writes."""

    dir: Path

    @property
    def ca_crt(self) -> str:
        return str(self.dir / "ca.crt")

    @property
    def server_crt(self) -> str:
        return str(self.dir / "server.crt")

    @property
    def server_key(self) -> str:
        return str(self.dir / "server.key")

    @property
    def client_crt(self) -> str:
        return str(self.dir / "client.crt")

    @property
    def client_key(self) -> str:
        return str(self.dir / "client.key")

    def credentials(self, client_certificate: bool = True) -> grpc.ChannelCredentials:
        ca = Path(self.ca_crt).read_bytes()
        if not client_certificate:
            return grpc.ssl_channel_credentials(ca)
        return grpc.ssl_channel_credentials(ca, Path(self.client_key).read_bytes(), Path(self.client_crt).read_bytes())

    def grpcurl_flags(self) -> list[str]:
        return ["-cacert", self.ca_crt, "-cert", self.client_crt, "-key", self.client_key]


def readme_certificate_commands() -> str:
    """The openssl commands of deploy/README.md's "Security" section (its first bash block), less
    the lines that change directory, install the files or comment."""
    section = (ROOT / "deploy/README.md").read_text().split("\n## Security\n", 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return "\n".join(line for line in script.splitlines() if not line.startswith(("mkdir", "sudo", "#")))


def make_certs(directory: Path) -> Certs:
    """A CA, the teacher's certificate (teacher, localhost, 127.0.0.1) and a client certificate,
    made by running the documented commands in ``directory``."""
    subprocess.run(
        ["bash", "-euc", readme_certificate_commands()], cwd=directory, check=True, capture_output=True, timeout=120
    )
    return Certs(directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificates (Debian: apt-get install openssl)")
    return make_certs(tmp_path_factory.mktemp("tls"))


def tls_overrides(certs: Certs) -> list[str]:
    return [
        f"server.tls_cert_file={certs.server_crt}",
        f"server.tls_key_file={certs.server_key}",
        f"server.tls_client_ca_file={certs.ca_crt}",
        f"server.auth_token_env={TOKEN_ENV}",
    ]


@pytest.fixture(scope="module")
def secure_teacher(tmp_path_factory, tiny_models, certs):
    """The teacher with mutual TLS and a bearer token; the token's variable is set for the module."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        log = tmp_path_factory.mktemp("secure-teacher") / "teacher.log"
        teacher = TeacherProcess(
            TEACHER_CPU_CONFIG,
            [f"engine.model={tiny_models.teacher}", "engine.kind=hf", *tls_overrides(certs)],
            log_path=log,
            credentials=certs.credentials(),
        )
        with teacher:
            yield teacher


@pytest.fixture(scope="module")
def fingerprint(tiny_models) -> str:
    return tokenizer_fingerprint(load_tokenizer(tiny_models.student))


def client_config(address: str, certs: Certs, **overrides) -> TeacherClientConfig:
    settings = dict(
        addresses=[address],
        top_k=TOP_K,
        connect_timeout_seconds=30.0,
        request_timeout_seconds=60.0,
        retry_budget_seconds=30.0,
        tls_ca_file=certs.ca_crt,
        tls_cert_file=certs.client_crt,
        tls_key_file=certs.client_key,
        auth_token_env=TOKEN_ENV,
    )
    return TeacherClientConfig(**{**settings, **overrides})


# ---- the trainer's production client ------------------------------------------------------------
def test_trainer_client_scores_over_mutual_tls_with_the_token(secure_teacher, certs, fingerprint, reference):
    ids = random_ids(50, seed=61)
    with TeacherClient(client_config(secure_teacher.address, certs)) as client:
        client.start(VOCAB, fingerprint)
        (topk,) = client.submit("secure", [ids]).result(timeout=120)
    assert_matches_reference(topk, reference.logprobs(ids), ids, rtol=2.0**-11)  # float16 on the wire


@pytest.mark.parametrize(
    "token, message", [(None, MISSING), ("not-the-token", INVALID)], ids=["no-token", "wrong-token"]
)
def test_trainer_client_without_the_right_token_fails_at_start(
    secure_teacher, certs, fingerprint, monkeypatch, token, message
):
    if token is not None:
        monkeypatch.setenv("HYPERDISTILL_TEST_WRONG_TOKEN", token)
    config = client_config(secure_teacher.address, certs, auth_token_env=token and "HYPERDISTILL_TEST_WRONG_TOKEN")
    client = TeacherClient(config)
    with pytest.raises(TeacherRequestError, match=re.escape(f"UNAUTHENTICATED: {message}")) as err:
        client.start(VOCAB, fingerprint)
    assert TOKEN not in str(err.value) and "not-the-token" not in str(err.value)
    client.close()


def test_trainer_client_without_a_client_certificate_gets_no_connection(secure_teacher, certs, fingerprint):
    config = client_config(
        secure_teacher.address, certs, tls_cert_file=None, tls_key_file=None, connect_timeout_seconds=2.0
    )
    client = TeacherClient(config)
    with pytest.raises(TeacherUnavailableError, match="did not answer GetInfo within 2 s"):
        client.start(VOCAB, fingerprint)
    client.close()


def test_tls_server_name_is_what_the_certificate_is_checked_against(secure_teacher, certs, fingerprint):
    with TeacherClient(client_config(secure_teacher.address, certs, tls_server_name="teacher")) as client:
        client.start(VOCAB, fingerprint)  # "teacher" is in the certificate, as compose's service name
    config = client_config(
        secure_teacher.address, certs, tls_server_name="elsewhere.example", connect_timeout_seconds=2.0
    )
    client = TeacherClient(config)
    with pytest.raises(TeacherUnavailableError, match="did not answer GetInfo within 2 s"):
        client.start(VOCAB, fingerprint)
    client.close()


def test_trainer_client_refuses_to_start_when_the_token_variable_is_unset(certs, fingerprint, monkeypatch):
    monkeypatch.delenv("HYPERDISTILL_TEST_UNSET", raising=False)
    client = TeacherClient(client_config("127.0.0.1:1", certs, auth_token_env="HYPERDISTILL_TEST_UNSET"))
    with pytest.raises(
        ValueError,
        match="teacher.auth_token_env names the environment variable HYPERDISTILL_TEST_UNSET, which is unset or empty",
    ):
        client.start(VOCAB, fingerprint)


# ---- each way in, on raw channels ---------------------------------------------------------------
async def _calls(
    address: str, credentials: grpc.ChannelCredentials | None, metadata, score: list[pb.ScoreRequest] = ()
) -> dict[str, object]:
    """GetInfo (unary) and Score (bidirectional stream, sending ``score``): the reply, the chunks,
    or ``(code, details)``. A refused Score gets no request: the refusal comes with the call's
    headers, and a write racing the server's end of a call turns its status into INTERNAL on grpc's
    asyncio client (grpc/grpc#36066; the trainer's client retries such a stream)."""
    channel = (
        grpc.aio.insecure_channel(address) if credentials is None else grpc.aio.secure_channel(address, credentials)
    )
    outcomes = {}
    async with channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        try:
            outcomes["GetInfo"] = await stub.GetInfo(pb.GetInfoRequest(), timeout=10, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            outcomes["GetInfo"] = (e.code(), e.details())
        call = stub.Score(*([iter(score)] if score else []), timeout=10, metadata=metadata)
        chunks = [chunk async for chunk in call] if score else []
        code = await call.code()
        outcomes["Score"] = chunks if code == grpc.StatusCode.OK else (code, await call.details())
    return outcomes


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize(
    "metadata, message",
    [
        (None, MISSING),
        (_bearer("wrong-" + "x" * 20), INVALID),
        ((("authorization", f"Basic {TOKEN}"),), MALFORMED),
        ((("authorization", "Bearer "),), MALFORMED),
    ],
    ids=["no-token", "wrong-token", "other-scheme", "empty-token"],
)
def test_teacher_service_calls_without_the_token_are_unauthenticated(secure_teacher, certs, metadata, message):
    outcomes = asyncio.run(_calls(secure_teacher.address, certs.credentials(), metadata))
    for name, (code, details) in outcomes.items():
        assert code == grpc.StatusCode.UNAUTHENTICATED, name
        assert message in details, name
        assert TOKEN not in details and "xxxx" not in details, name


def test_teacher_service_calls_with_the_token_are_served(secure_teacher, certs):
    request = pb.ScoreRequest(request_id="r", token_ids=pack_token_ids(random_ids(9, seed=5)), top_k=TOP_K)
    outcomes = asyncio.run(_calls(secure_teacher.address, certs.credentials(), _bearer(TOKEN), [request]))
    assert outcomes["GetInfo"].vocab_size == VOCAB
    assert outcomes["Score"][-1].last and outcomes["Score"][-1].request_id == "r"


@pytest.mark.parametrize("client_certificate", [False, None], ids=["no-client-certificate", "plaintext"])
def test_without_a_client_certificate_or_tls_the_connection_fails(secure_teacher, certs, client_certificate):
    credentials = None if client_certificate is None else certs.credentials(client_certificate=False)
    outcomes = asyncio.run(_calls(secure_teacher.address, credentials, _bearer(TOKEN)))
    assert {name: code for name, (code, _) in outcomes.items()} == {
        "GetInfo": grpc.StatusCode.UNAVAILABLE,
        "Score": grpc.StatusCode.UNAVAILABLE,
    }


def test_health_needs_no_token(secure_teacher, certs):
    async def check() -> int:
        async with grpc.aio.secure_channel(secure_teacher.address, certs.credentials()) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            return reply.status

    assert asyncio.run(check()) == health_pb2.HealthCheckResponse.SERVING


# ---- grpcurl, as documented and as compose's health check runs it ---------------------------------
def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_health_reflection_and_get_info_over_mutual_tls(secure_teacher, certs):
    address, tls = secure_teacher.address, certs.grpcurl_flags()
    health = _grpcurl(*tls, "-d", '{"service": ""}', address, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"status": "SERVING"' in health.stdout, health.stderr
    listed = _grpcurl(*tls, address, "list")
    assert "hyperdistill.teacher.v1.TeacherService" in listed.stdout.split(), listed.stderr
    get_info = "hyperdistill.teacher.v1.TeacherService/GetInfo"
    info = _grpcurl(*tls, "-H", f"authorization: Bearer {TOKEN}", address, get_info)
    assert info.returncode == 0 and f'"vocab_size": {VOCAB}' in info.stdout, info.stderr
    refused = _grpcurl(*tls, address, get_info)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr and MISSING in refused.stderr
    no_certificate = _grpcurl("-cacert", certs.ca_crt, "-d", '{"service": ""}', address, "grpc.health.v1.Health/Check")
    assert no_certificate.returncode != 0


def _compose() -> dict:
    return yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())


def test_compose_health_check_passes_with_tls_flags(secure_teacher, certs):
    """Compose's health check with deploy/.env's GRPCURL_TLS_FLAGS. ``${GRPCURL_TLS_FLAGS:--plaintext}``
    means the same to compose (which fills it in) and to sh (which does here)."""
    kind, command = _compose()["services"]["teacher"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = command.replace("127.0.0.1:50051", secure_teacher.address)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = lambda env: subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=60)  # noqa: E731
    assert run({**env, "GRPCURL_TLS_FLAGS": " ".join(certs.grpcurl_flags())}).returncode == 0
    assert run({**env, "GRPCURL_TLS_FLAGS": ""}).returncode != 0  # plaintext against TLS


def test_compose_passes_certificates_and_token_to_both_services():
    services = _compose()["services"]
    for name in ("teacher", "trainer"):
        assert services[name]["environment"]["TEACHER_AUTH_TOKEN"] == "${TEACHER_AUTH_TOKEN:-}", name
        assert "${TLS_DIR:-/srv/hyperdistill/tls}:/tls:ro" in services[name]["volumes"], name
    assert services["teacher"]["environment"]["GRPCURL_TLS_FLAGS"] == "${GRPCURL_TLS_FLAGS:--plaintext}"
    example = dict(
        line.split("=", 1)
        for line in (ROOT / "deploy/.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["TEACHER_AUTH_TOKEN"] == "" and example["GRPCURL_TLS_FLAGS"] == ""
    for config in (
        "teacher.cpu.yaml",
        "teacher.demo.yaml",
        "teacher.h200.yaml",
        "trainer.cpu.yaml",
        "trainer.h200.yaml",
    ):
        text = (ROOT / "deploy/configs" / config).read_text()
        assert "tls_" not in text and "auth_token_env" not in text, f"{config}: security is off by default"


# ---- configuration --------------------------------------------------------------------------------
def test_server_config_errors_name_the_field(certs, tmp_path):
    not_pem = tmp_path / "server.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    cases = [
        (dict(tls_cert_file=certs.server_crt), "server.tls_cert_file is set but tls_key_file is not"),
        (dict(tls_key_file=certs.server_key), "server.tls_key_file is set but tls_cert_file is not"),
        (dict(tls_client_ca_file=certs.ca_crt), "server.tls_client_ca_file needs tls_cert_file"),
        (
            dict(tls_cert_file=str(tmp_path / "nope.crt"), tls_key_file=certs.server_key),
            f"server.tls_cert_file: cannot read '{tmp_path / 'nope.crt'}'",
        ),
        (dict(tls_cert_file=certs.server_crt, tls_key_file=str(not_pem)), "server.tls_key_file: "),
        (dict(auth_token_env="Bearer abc123"), "server.auth_token_env must name the environment variable"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_dict(ServerConfig, fields, prefix="server.")
    config = load_config(TeacherConfig, TEACHER_CPU_CONFIG, tls_overrides(certs))
    assert config.server.tls_client_ca_file == certs.ca_crt and config.server.auth_token_env == TOKEN_ENV


def test_client_config_errors_name_the_field(certs):
    cases = [
        (
            dict(tls_cert_file=certs.client_crt, tls_key_file=certs.client_key),
            "teacher.tls_cert_file needs tls_ca_file",
        ),
        (
            dict(tls_ca_file=certs.ca_crt, tls_key_file=certs.client_key),
            "teacher.tls_key_file is set but tls_cert_file is not",
        ),
        (dict(auth_token_env=TOKEN_ENV), "teacher.auth_token_env needs tls_ca_file"),
        (dict(tls_server_name="teacher"), "teacher.tls_server_name needs tls_ca_file"),
        (dict(tls_ca_file="/nonexistent/ca.crt"), "teacher.tls_ca_file: cannot read '/nonexistent/ca.crt'"),
        (dict(tls_ca_file=certs.ca_crt, auth_token_env=TOKEN), "teacher.auth_token_env must name the environment"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_dict(TeacherClientConfig, fields, prefix="teacher.")


def test_teacher_refuses_to_start_when_the_token_variable_is_unset(monkeypatch):
    monkeypatch.delenv("HYPERDISTILL_TEST_UNSET", raising=False)
    config = load_config(
        TeacherConfig,
        TEACHER_CPU_CONFIG,
        ["engine.model=unused", "server.port=0", "server.auth_token_env=HYPERDISTILL_TEST_UNSET"],
    )
    with pytest.raises(
        ValueError,
        match="server.auth_token_env names the environment variable HYPERDISTILL_TEST_UNSET, which is unset or empty",
    ):
        asyncio.run(serve(config))


# ---- no pickles ---------------------------------------------------------------------------------
def test_nothing_pickled_on_the_wire():
    packed = {
        f"{message.name}.{field.name}"
        for message in pb.DESCRIPTOR.message_types_by_name.values()
        for field in message.fields
        if field.type == field.TYPE_BYTES
    }
    # Packed little-endian numbers, decoded with np.frombuffer (common/codec.py).
    assert packed == {
        "ScoreRequest.token_ids",
        "ScoreChunk.topk_ids",
        "ScoreChunk.topk_logprobs",
        "ScoreChunk.target_logprobs",
    }
    wire = [
        ROOT / "common/codec.py",
        *sorted((ROOT / "trainer/teacher_client").glob("*.py")),
        *sorted((ROOT / "teacher_service").glob("*.py")),
    ]
    for path in wire:
        assert not re.search(r"\bpickle\b|torch\.load|allow_pickle|marshal", path.read_text()), path


def test_checkpoints_load_weights_only(tmp_path):
    source = (ROOT / "trainer/checkpoint.py").read_text()
    loads = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert loads and all("weights_only=True" in args for args in loads), loads
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    # What trainer.train saves: plain data, and the three RNG states (numpy's holds an ndarray).
    state = {
        "step": 3,
        "sampler": {"epoch": 1, "lengths_sha256": "ab"},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    checkpointer = Checkpointer(CheckpointConfig(dir=str(tmp_path)), rank=0)
    path = checkpointer.save(3, model, optimizer, state, {"config": "x"})
    loaded = checkpointer.load(path, model, optimizer)
    assert loaded["step"] == 3 and loaded["sampler"] == state["sampler"]
    np.testing.assert_array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
