"""Write-then-rename for datasets and cache files (through `tff_privseg.io`): complete or absent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tff_privseg import io
from tff_privseg.errors import UserError


def has_visible_entries(folder: Path) -> bool:
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


@contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder next to ``target``; on success it becomes ``target``.

    ``target`` must be missing or hold no visible entries (e.g. only ``.cache``, which stays).
    On any error, Ctrl-C included, the temp folder is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError("exists and is not a folder", target)
    if has_visible_entries(target):
        raise UserError("already exists and is not empty; choose another folder", target)
    with io.staged_dir(target, private=True) as tmp:
        yield tmp


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``io.atomic_write`` of a cache file; a failure stays an OSError (the loader warns on it
    and goes on without the cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        io.atomic_write(path, write, mode=0o600)
    except UserError as e:
        raise OSError(str(e)) from e
