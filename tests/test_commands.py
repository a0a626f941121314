"""Every command the README, deploy/README.md, the Makefile and the deploy files show still works:
each `make` target's dry run (``make -n``) succeeds, and each first-party ``python -m MODULE`` they
name (in the docs, or in a target's dry-run commands) answers ``--help``. Moving or renaming a
module without updating its commands fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "deploy/README.md",
    ROOT / "Makefile",
    ROOT / "deploy/deploy.mk",
    ROOT / "deploy/compose.yaml",
    *sorted((ROOT / "deploy").glob("*.Dockerfile")),
    *sorted(ROOT.glob("tests/*/README.md")),
]
FIRST_PARTY = ("hyperdistill", "tests")
# `python -m X`, `$(PY) -m X`, `torchrun ... -m X` and compose's ["python3", "-m", "X"].
MODULE = re.compile(r"""(?:python3?|\$\(PY\)|torchrun[^\n]*?)["',\s]+-m["',\s]+([A-Za-z_][\w.]*)""")


def make_targets() -> list[str]:
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    targets = [line.split()[1] for line in out.splitlines() if line.strip().startswith("make ")]
    assert len(targets) >= 10, out
    return targets


def dry_run(target: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)


def documented_modules() -> list[str]:
    text = "\n".join(path.read_text() for path in DOCS)
    text += "\n".join(dry_run(target).stdout for target in make_targets())
    modules = {m for m in MODULE.findall(text) if m.split(".")[0] in FIRST_PARTY}
    assert {"hyperdistill.trainer", "hyperdistill.teacher_service", "hyperdistill.trainer.plan"} <= modules, sorted(
        modules
    )
    return sorted(modules)


@pytest.mark.parametrize("target", make_targets())
def test_make_target_dry_run(target):
    result = dry_run(target)
    assert result.returncode == 0, f"make -n {target}:\n{result.stderr}"


@pytest.mark.parametrize("module", documented_modules())
def test_documented_module_answers_help(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"python -m {module} --help:\n{result.stderr[-2000:]}"
    assert "usage:" in result.stdout, result.stdout[:500]
