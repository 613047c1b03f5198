"""A site's persistent state: its secret key and, per training run, its privacy ledger and the
rounds it has run. Everything is written atomically (`tff_privseg.io`), secrets 0600 in 0700
folders, and survives restarts.

    STATE/site_key          64 hex digits, the site's secret (never leaves the site)
    STATE/runs/RUN_ID.json  per run: the config digest, the ledger (privacy/accounting), and
                            for every round run: the digest of what was asked (weights, lr)
    STATE/cache/            preprocessed slices of the site's scans

The key of a run is a PRF of the site key and the coordinator's public run id
(`derive_run_key`): one site key serves many runs, and no two runs share noise or samples. A
round asked again with the same digest (coordinator crash + `--resume`) is run again with the
same key, so it releases the same update, and is not counted again; asked with another digest
(other weights under the same noise, whose difference would cancel the noise) it is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any

from tff_privseg.errors import UserError
from tff_privseg.io import atomic_write_text, os_problem, private_dir

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def derive_run_key(site_key: str, run_id: str) -> str:
    """The site's secret key for one run (sampling, augmentation, DP noise): 64 hex digits."""
    h = hashlib.blake2b(run_id.encode(), key=bytes.fromhex(site_key), person=b"site-run-key")
    return h.hexdigest()[:64]


def run_id_of(run_key: str) -> str:
    """A run's public id, as the coordinator gives it to the sites: a PRF of the coordinator's
    run key (it reveals nothing about the key; the same run keeps it across --resume)."""
    h = hashlib.blake2b(b"cross-silo", key=bytes.fromhex(run_key), person=b"silo-run-id")
    return h.hexdigest()[:32]


class SiteState:
    def __init__(self, folder: str | Path) -> None:
        self.folder = private_dir(folder)
        self.key_file = self.folder / "site_key"
        self.runs = self.folder / "runs"
        self.cache = self.folder / "cache"

    def key(self) -> str:
        """The site key: read, or created once (0600) and kept across restarts."""
        if not self.key_file.exists():
            atomic_write_text(self.key_file, secrets.token_hex(32) + "\n", mode=0o600)
        try:
            key = self.key_file.read_text().strip()
        except OSError as e:
            raise UserError(f"unreadable site key ({os_problem(e)})", self.key_file) from None
        if not _HEX64.match(key):
            raise UserError("site key is not 64 hex digits", self.key_file)
        if self.key_file.stat().st_mode & 0o077:
            raise UserError("site key is readable by other users: chmod 600 it", self.key_file)
        return key

    def run_file(self, run_id: str) -> Path:
        if not _RUN_ID.match(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.runs / f"{run_id}.json"

    def load_run(self, run_id: str) -> dict[str, Any] | None:
        path = self.run_file(run_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UserError(f"unreadable run state ({os_problem(e) or e})", path) from None

    def save_run(self, run_id: str, record: dict[str, Any]) -> None:
        private_dir(self.runs)
        atomic_write_text(self.run_file(run_id), json.dumps(record, indent=1), mode=0o600)

    def all_runs(self) -> dict[str, dict[str, Any]]:
        if not self.runs.exists():
            return {}
        out = {}
        for p in sorted(self.runs.glob("*.json")):
            record = self.load_run(p.stem) if _RUN_ID.match(p.stem) else None
            if record is not None:
                out[p.stem] = record
        return out
