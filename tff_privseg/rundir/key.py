"""The run's secret key and the keyed digest of its data.

The key (256 bits as hex, `secret/run_key`) keys the sampling PRF and the DP noise; the digest
(`secret/data_digest`) lets `--resume` refuse other data without revealing anything about it.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

import numpy as np

from tff_privseg.data import SiteData
from tff_privseg.errors import UserError
from tff_privseg.io import os_problem

if TYPE_CHECKING:
    from tff_privseg.rundir.writer import RunDir

Key = int | bytes | str


def key_bytes(key: Key) -> bytes:
    """The BLAKE2b key (at most 64 bytes) for a run key given as int, bytes or str."""
    if isinstance(key, bool) or not isinstance(key, int | bytes | str):
        raise TypeError(f"run key must be int, bytes or str, not {type(key).__name__}")
    if isinstance(key, int):
        if key < 0:
            raise ValueError("run key must be non-negative")
        raw = b"int:" + key.to_bytes(max(8, (key.bit_length() + 7) // 8), "little")
    else:
        raw = (b"str:" + key.encode()) if isinstance(key, str) else b"bytes:" + key
    return raw if len(raw) <= 64 else hashlib.blake2b(raw).digest()


def new_run_key() -> str:
    """The run's secret, 256 bits as hex: it keys the sampling PRF and the DP noise.

    Never in the config, never printed. 256 bits so that no search over keys can recover the
    sample from what a run releases.
    """
    return secrets.token_hex(32)


def read_run_key(run: RunDir) -> str:
    """The persisted key of `run` (UserError if unreadable or not 64 hex digits)."""
    try:
        key = run.key_file.read_text().strip()
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError("not a 256-bit hex key")
        return key
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable run key ({os_problem(e) or e})", run.key_file) from None


def data_digest(sites: list[SiteData], key: str) -> str:
    """Keyed BLAKE2b of what training and validation read: every site's slices, labels and
    patients (keyed with the run key: without it, the digest reveals nothing about them)."""
    h = hashlib.blake2b(key=key_bytes(key), person=b"data")
    for s in sites:
        h.update(s.name.encode() + b"\0")
        for part in (s.train, s.val):
            for a in (part.images, part.labels, part.volume_index):
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(a.data)
    return h.hexdigest()
