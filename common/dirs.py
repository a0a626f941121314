"""Directories shared by processes: build once under a lock, then swap in whole.

Used by the tiny-model cache and the prepared-data cache, which every test worker or rank may
ask for at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock


def dir_lock(path: Path) -> FileLock:
    """An exclusive inter-process lock for building `path` (the lock file sits beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.parent / f".{path.name}.lock")


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, swapping out any previous `target` without a gap in which
    a reader could see a half-deleted directory."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
        target.rename(stale / target.name)
        new.rename(target)
        shutil.rmtree(stale)
    else:
        new.rename(target)


def default_permissions(root: Path) -> None:
    """Give ``root`` and everything in it the permissions a plain ``mkdir`` and ``open`` would
    (0777 / 0666 less the umask): ``tempfile.mkdtemp`` makes 0700, which another user, such as a
    serving process, cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
