"""Atomic file writes: a file is either its old complete self, the new complete one, or absent.

Every writer goes to a temporary name in the target's folder, is flushed and fsynced, then
renamed over the target, and the folder is fsynced so the rename survives a power cut. On any
failure (disk full, a size limit, Ctrl-C) the temporary file is removed and the target is left
untouched; an OS problem becomes one `UserError` naming the target and the problem ("No space
left on device"), also when a library (h5py) reports it inside its own exception text.

`mode=None` gives the usual permissions (0o666 minus the umask); a `mode` is set exactly,
whatever the umask, and the temporary file is created with it, so a secret is never readable by
others even for a moment. `private_dir` makes a 0700 folder for such files.

`staged_dir` does the same for a whole folder: it is built under a temporary name next to its
target and takes the target's place by one rename once complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tff_privseg.errors import UserError

_ERRNO = re.compile(r"errno = (\d+)")


def atomic_write(
    path: str | Path, data: bytes | str | Callable[[BinaryIO], None], mode: int | None = None
) -> Path:
    """Write bytes, text (UTF-8) or whatever `data(fileobj)` writes to `path`, atomically."""
    path = Path(path)
    with atomic_path(path, mode=mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode else 0o666)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
    return path


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    return atomic_write(path, text, mode)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, data, mode)


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path (same folder, name ending in `path`'s name) for a library to save to.

    The whole name is kept at the end because libraries pick the format from it (Keras 2.14
    writes its `.weights.h5` format only to names ending in `.weights.h5`, legacy HDF5 else).

    On success the file is fsynced, given `mode` and renamed to `path`; on failure it is
    removed and the error re-raised (an OS problem as a one-line `UserError` naming `path`).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}.{path.name}")
    _remove(tmp)
    try:
        yield tmp
        finish(tmp, path, mode)
    except BaseException as e:
        _remove(tmp)
        problem = os_problem(e)
        if problem is not None:
            raise UserError(f"cannot write ({problem})", path) from e
        raise


def finish(tmp: Path, path: Path, mode: int | None = None) -> None:
    """fsync `tmp`, set its `mode`, rename it to `path` and fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def staged_dir(
    target: str | Path, *, replace: bool = False, private: bool = False
) -> Iterator[Path]:
    """Yield a fresh folder next to `target`; on success it becomes `target`.

    A missing or empty `target` is replaced by one rename. An existing one is, with `replace`,
    renamed aside and removed after the rename; without it, it may hold only hidden entries
    (e.g. `.cache`), which stay: the new entries are moved in beside them (UserError if a
    visible entry appeared meanwhile). The folder gets the usual permissions (0o777 minus the
    umask); `private` keeps it 0700. On any error, Ctrl-C included, the temporary folder is
    removed and `target` is left as it was. Checking that `target` may be written is the
    caller's part.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write here ({e.strerror})", target.parent) from None
    try:
        if not private:
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _publish(tmp, target, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    """Put the complete folder `tmp` in `target`'s place (see `staged_dir`)."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)
        return
    if replace:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    if any(not p.name.startswith(".") for p in target.iterdir()):
        raise UserError("was filled by someone else while writing; nothing changed", target)
    for child in sorted(tmp.iterdir()):
        os.replace(child, target / child.name)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if missing and make it 0700, whatever the umask."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def os_problem(e: BaseException) -> str | None:
    """The OS's words for what went wrong ("No space left on device"), or None if not an OS fault.

    h5py reports a failed write as RuntimeError("... errno = 28, error message = '...'").
    """
    if isinstance(e, UserError):
        return None
    if isinstance(e, OSError) and e.errno is not None:
        return e.strerror or os.strerror(e.errno)
    found = _ERRNO.search(str(e)) if isinstance(e, RuntimeError | OSError) else None
    return os.strerror(int(found.group(1))) if found else None


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
