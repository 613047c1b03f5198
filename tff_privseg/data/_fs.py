"""Write-then-rename helpers: a dataset or cache file is either complete or absent."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tff_privseg.errors import UserError


def has_visible_entries(folder: Path) -> bool:
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``target``; on success it becomes ``target``.

    ``target`` must be missing or hold no visible entries (e.g. only ``.cache``). On any error,
    Ctrl-C included, the temp folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError("exists and is not a folder", target)
    if has_visible_entries(target):
        raise UserError("already exists and is not empty; choose another folder", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path) -> None:
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)  # one atomic rename
        return
    if has_visible_entries(target):
        raise UserError("was filled by someone else while writing; nothing changed", target)
    for child in sorted(tmp.iterdir()):  # target holds only hidden entries (e.g. .cache)
        os.replace(child, target / child.name)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
