"""The leak check of tests/conftest.py: which children count as left behind, and which test fails."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil

from tests.conftest import ROOT, leaked_children

# Run by an inner pytest, from a directory below its rootdir (as tests/ is) whose conftest is
# tests/conftest.py: fixtures of each scope that keep a child, one that forgets to stop it, a test
# that hands a restarted child to its fixture, and a leak.
INNER_TESTS = """
import subprocess

import pytest

from tests.conftest import adopt


@pytest.fixture(scope="session")
def kept():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def never_stopped():
    yield subprocess.Popen(["sleep", "61"])


@pytest.fixture(scope="module")
def restartable(request):
    state = {"process": subprocess.Popen(["sleep", "62"]), "owner": request}
    yield state
    state["process"].kill()
    state["process"].wait()


def test_restarts_a_fixture_process(kept, restartable):
    restartable["process"].kill()
    restartable["process"].wait()
    restartable["process"] = subprocess.Popen(["sleep", "63"])
    adopt(restartable["owner"], restartable["process"].pid)


def test_leaks(kept):
    subprocess.Popen(["sleep", "64"])


def test_module_fixture_left_running(never_stopped):
    pass


def test_last(kept):
    pass
"""


def test_a_child_left_running_is_found_and_one_reaped_is_not():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert sleeper.pid in {p.pid for p in leaked_children(set(), grace=0.5)}
        assert sleeper.pid not in {p.pid for p in leaked_children({sleeper.pid}, grace=0.5)}  # a fixture's
    finally:
        sleeper.kill()
    # Killed but not yet reaped (a zombie): nothing runs, nothing is reported.
    assert sleeper.pid not in {p.pid for p in leaked_children(set(), grace=0.5)}
    sleeper.wait()


def test_an_orphan_is_found():
    """A grandchild whose parent exited (say, a rank of a SIGKILLed torchrun) is re-parented to the session."""
    shell = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    orphan = psutil.Process(int(shell.stdout))
    try:
        assert orphan.pid in {p.pid for p in leaked_children(set(), grace=0.5)}
    finally:
        orphan.kill()
        orphan.wait(10)  # reaps it: it is this process's child now


def test_the_teardown_a_child_outlives_fails(tmp_path):
    """The leaking test fails at its teardown, the forgetful module fixture at the teardown of the
    module's last test; fixtures' children (session, module, adopted) are no leaks."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner/conftest.py").write_text("from tests.conftest import *  # noqa: F403\n")
    (tmp_path / "inner/test_inner.py").write_text(INNER_TESTS)
    inner = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--rootdir={tmp_path}",
            f"--basetemp={tmp_path / 'tmp'}",
            str(tmp_path / "inner/test_inner.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "4 passed, 2 errors" in inner.stdout, inner.stdout[-3000:]
    for test, command in (("test_leaks", "sleep 64"), ("test_last", "sleep 61")):
        assert re.search(
            rf"ERROR at teardown of {test} _+\nchild processes outlived the test \(now killed\): "
            rf"pid \d+: {command}\n",
            inner.stdout,
        ), inner.stdout[-3000:]
