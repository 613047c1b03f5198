"""Run TFF's worker_binary where no network can reach it; expose it on a private Unix socket.

The shipped worker listens on every interface (`[::]:PORT`, no bind flag) and executes any
TensorFlow graph it is sent, file reads included. This process (stdlib only, started fresh so it
is single-threaded) moves itself into a new network namespace that has nothing but loopback,
starts the worker there, and forwards a Unix socket (mode 0600, inside a 0700 directory) to the
worker's loopback port. Unix sockets live in the file system, not in the network namespace, so
the coordinator reaches the worker through the socket while no host, and no other network
namespace on this host, can reach the port.

Both this bridge and the worker die with their parent (PR_SET_PDEATHSIG), whatever kills it.

Protocol with the parent: one line on stdout, ``READY <socket> <port> <isolated:0|1>``, or
``FAILED <reason>``. Usage: ``python -m tff_privseg.runtime.netns_bridge WORKER_BINARY DIR``.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_PDEATHSIG = 1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (any way it exits)."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def enter_private_network() -> str | None:
    """Move this (single-threaded) process into a new network namespace with loopback up.

    Returns None on success, else the reason it was not possible.
    """
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
    if flags & CLONE_NEWUSER:
        try:
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{gid} {gid} 1")
        except OSError as e:
            return f"user namespace mapping failed: {e}"
    # A new namespace's loopback starts DOWN; bring it up (what `ip link set lo up` does).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh", b"lo", 0)
        flags_now = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags_now | IFF_UP))
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's environment: ours (`base`), plus one glibc malloc arena for the worker.

    The worker runs TensorFlow on ~37 threads, to which glibc hands up to 8 malloc arenas per
    core; the free memory that each arena keeps grew the worker's RSS by ~4 MiB per round
    without levelling off (`benchmarks/memory.py`, 3 sites, 64x64 U-Net, 40 rounds:
    +93 to +136 MiB from round 5 to 30), while glibc's own count of bytes in use stayed flat
    (malloc_stats: 430-480 MiB from round 3 to 40): fragmentation, not a leak. With
    MALLOC_ARENA_MAX=1: +66 MiB; with it and contexts.py's prompt disposal, +38 to +62 MiB,
    level from round ~30 on; same median round time on 2 cores (README, Performance: stalled
    rounds seen with 1, 2 and 8 arenas alike). Only the worker gets it (not this
    bridge, not the coordinator); an arena limit the user set (MALLOC_ARENA_MAX, or arena_max
    in GLIBC_TUNABLES) is kept.
    """
    env = dict(os.environ if base is None else base)
    if "MALLOC_ARENA_MAX" not in env and "arena_max" not in env.get("GLIBC_TUNABLES", ""):
        env["MALLOC_ARENA_MAX"] = "1"
    return env


def start_worker(binary: str, port: int, log_path: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child for its lifetime
    return subprocess.Popen(
        [binary, f"--port={port}", "--max_concurrent_computation_calls=-1"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=worker_env(),
        preexec_fn=die_with_parent,
    )


def wait_for_port(port: int, worker: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker_binary exited with code {worker.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"worker_binary did not listen on port {port} within {timeout:.0f} s")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 20):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def serve(sock_path: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    old_umask = os.umask(0o177)  # the socket is created 0600: only this user may connect
    try:
        server = await asyncio.start_unix_server(handle, path=sock_path, limit=1 << 22)
    finally:
        os.umask(old_umask)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    binary, run_dir = argv[1], argv[2]
    die_with_parent()
    if os.getppid() == 1:  # parent already gone before prctl took effect
        return 1
    reason = enter_private_network()
    if reason and os.environ.get("TFF_PRIVSEG_REQUIRE_NETNS") == "1":
        print(f"FAILED {reason}", flush=True)
        return 1
    port = free_port()
    worker = start_worker(binary, port, os.path.join(run_dir, "worker.log"))
    signal.signal(signal.SIGTERM, lambda *_: (worker.kill(), sys.exit(0)))
    try:
        wait_for_port(port, worker)
    except RuntimeError as e:
        worker.kill()
        print(f"FAILED {e}", flush=True)
        return 1
    sock_path = os.path.join(run_dir, "worker.sock")
    print(f"READY {sock_path} {port} {0 if reason else 1} {reason or ''}", flush=True)
    try:
        asyncio.run(serve(sock_path, port))
    finally:
        worker.kill()
        worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
