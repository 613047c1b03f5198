"""What travels between a site and the coordinator, and how: gRPC over mutual TLS.

A message is one serialized `TensorProto` of strings: element 0 is a small JSON header, each
further element a serialized `TensorProto` (`tf.make_tensor_proto` / `tf.make_ndarray`). No
pickle, no hand-made framing: gRPC carries the bytes, protobuf parses them. Three unary
methods of the generic service `tff_privseg.Site`: `Hello` (config in, site facts out),
`Round` (global weights in, noised delta out), `Evaluate` (global weights in, validation
counts out).

Test and measurement hook: with `TFF_PRIVSEG_WIRE_LOG=FILE` in the environment every message
encoded or decoded appends one JSON line to FILE (side, direction, method, tensor shapes and
dtypes, bytes), on both sides.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np

SERVICE = "tff_privseg.Site"
METHODS = ("Hello", "Round", "Evaluate")
# Whole models travel in one message: gRPC's default 4 MiB receive limit is too small for a
# 256 px MoNet's weights.
OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]
LOG_ENV = "TFF_PRIVSEG_WIRE_LOG"
_log_lock = threading.Lock()


def encode(header: dict[str, Any], tensors: list[np.ndarray], *, side: str, method: str) -> bytes:
    import tensorflow as tf

    parts = [json.dumps(header, sort_keys=True).encode()]
    parts += [tf.make_tensor_proto(np.asarray(t)).SerializeToString() for t in tensors]
    data = tf.make_tensor_proto(np.array(parts, dtype=object)).SerializeToString()
    _log(side, "send", method, tensors, len(data))
    return data


def decode(data: bytes, *, side: str, method: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    import tensorflow as tf
    from tensorflow.core.framework.tensor_pb2 import TensorProto

    parts = tf.make_ndarray(TensorProto.FromString(data)).reshape(-1).tolist()
    if not parts:
        raise ValueError("empty message")
    header = json.loads(parts[0].decode())
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    tensors = [tf.make_ndarray(TensorProto.FromString(p)) for p in parts[1:]]
    _log(side, "recv", method, tensors, len(data))
    return header, tensors


def _log(side: str, direction: str, method: str, tensors: list, size: int) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps(
        {
            "pid": os.getpid(),
            "side": side,
            "direction": direction,
            "method": method,
            "shapes": [list(np.shape(t)) for t in tensors],
            "dtypes": [str(np.asarray(t).dtype) for t in tensors],
            "bytes": size,
        }
    )
    with _log_lock, open(Path(path), "a") as f:
        f.write(line + "\n")


def server_credentials(cert: Path, key: Path, ca: Path) -> grpc.ServerCredentials:
    """Mutual TLS: the site's certificate, and client certificates signed by the CA required."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(cert: Path, key: Path, ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes(),
        certificate_chain=Path(cert).read_bytes(),
    )
