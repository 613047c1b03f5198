"""Output folders and files of the result commands (evaluate, predict, export, report).

A folder is written next to its target and renamed into place (``io.staged_dir``); an earlier
output of the same kind, recognised by its marker file, may be replaced, anything else is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib

from tff_privseg.errors import UserError
from tff_privseg.io import atomic_path, staged_dir


def check_output(target: str | Path, marker: str, replace: bool = True) -> Path:
    """``target`` is missing, empty, or (``replace``) an earlier output holding ``marker``."""
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise UserError("exists and is not a folder", target)
        earlier = (target / marker).is_file()
        if earlier and not replace:
            raise UserError("holds an earlier output; use --force to replace it", target)
        if not earlier and any(target.iterdir()):
            raise UserError("exists and is not empty; choose another --out", target)
    return target


@contextmanager
def staged_output(target: str | Path, marker: str, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on success it becomes ``target`` (one rename).

    ``target`` must be missing, empty, or (when ``replace``) an earlier output of the same kind,
    recognised by its ``marker`` file. On any error the temp folder is removed and ``target`` is
    left as it was: nothing half-written.
    """
    with staged_dir(check_output(target, marker, replace), replace=True) as tmp:
        yield tmp


def save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` to a temp file next to ``path``, then rename it into place."""
    with atomic_path(path) as tmp:  # the name keeps its .nii(.gz) ending: nibabel reads it
        nib.save(img, tmp)
