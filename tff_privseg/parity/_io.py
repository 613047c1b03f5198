"""Small file helpers without TensorFlow (the federated checkpoint module imports it)."""

from __future__ import annotations

import os
from pathlib import Path

from tff_privseg.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync and rename."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserError("is a directory", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write ({e.strerror or e})", path) from None
