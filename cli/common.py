"""Shared CLI plumbing: the options several commands take, one-line errors, --json output,
quiet TensorFlow."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from tff_privseg.errors import UserError, printable

# Keep TensorFlow's C++ start-up chatter and pfor fallback warnings off the user's terminal
# (set before TF is imported).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gRPC's C core logs each failed TLS handshake / lost connection to a remote worker on stderr
# (8 lines before our one-line error, and absl's "before InitializeLog" banner): the error
# already says what happened. GRPC_VERBOSITY=ERROR (or DEBUG) in the environment brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
logging.getLogger("absl").setLevel(logging.ERROR)  # TFF's Python-side warnings (absl logging)
logging.getLogger("tensorflow").setLevel(logging.ERROR)


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and infinity (click's FLOAT and FloatRange accept "nan":
    every comparison with it is false), within [lo, hi] (lo excluded when ``lo_open``)."""

    name = "number"

    def __init__(self, lo: float, hi: float, lo_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        above = number > self.lo if self.lo_open else number >= self.lo
        if not (math.isfinite(number) and above and number <= self.hi):
            bound = "(" if self.lo_open else "["
            lo, hi = (f"{x:.0f}" if float(x).is_integer() else f"{x:g}" for x in (self.lo, self.hi))
            self.fail(f"{value!r} is not a finite number in {bound}{lo}, {hi}]")
        return number


Decorator = Callable[[Callable], Callable]
_PATH_KEYS = ("exists", "file_okay", "dir_okay", "path_type")


def path_option(*decls: str, **attrs: Any) -> Decorator:
    """A click option of type click.Path: the keys of ``attrs`` named in _PATH_KEYS configure
    the Path, the rest (help, required, default, ...) the option."""
    path = {k: attrs.pop(k) for k in _PATH_KEYS if k in attrs}
    return click.option(*decls, type=click.Path(**path), **attrs)


def run_option(help: str = "Run directory.", **attrs: Any) -> Decorator:
    """``--run`` into parameter ``run_dir``."""
    return path_option("--run", "run_dir", help=help, **attrs)


def data_option(help: str = "Dataset root.", **attrs: Any) -> Decorator:
    """``--data`` into parameter ``data_root``."""
    return path_option("--data", "data_root", help=help, **attrs)


def config_option(help: str, **attrs: Any) -> Decorator:
    """``--config`` (a file) into parameter ``config_path``."""
    return path_option("--config", "config_path", dir_okay=False, help=help, **attrs)


def out_option(help: str, **attrs: Any) -> Decorator:
    """``--out`` into parameter ``out``."""
    return path_option("--out", "out", help=help, **attrs)


def tls_dir_option(help: str, **attrs: Any) -> Decorator:
    """``--tls-dir``: a folder of PEM files."""
    return path_option("--tls-dir", file_okay=False, help=help, **attrs)


def round_option(help: str) -> Decorator:
    """``--round`` (a checkpoint round) into parameter ``round_num``."""
    return click.option("--round", "round_num", type=int, help=help)


def quiet_option(help: str = "No progress bar.") -> Decorator:
    return click.option("--quiet", is_flag=True, help=help)


def force_option(help: str) -> Decorator:
    return click.option("--force", is_flag=True, help=help)


def seed_option(**attrs: Any) -> Decorator:
    return click.option("--seed", type=int, **attrs)


def batch_size_option(**attrs: Any) -> Decorator:
    """``--batch-size``: a whole number >= 1, 32 by default, unless ``attrs`` says otherwise."""
    return click.option(
        "--batch-size", **{"type": click.IntRange(1), "default": 32, "show_default": True} | attrs
    )


def choice_option(*decls: str, choices: list[str], default: str, help: str) -> Decorator:
    """One of ``choices``, ``default`` shown in --help."""
    return click.option(
        *decls, type=click.Choice(choices), default=default, show_default=True, help=help
    )


def json_option(fn: Callable) -> Callable:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON object as the last line of stdout."
    )(fn)


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], None]) -> None:
    """Print `result` for people, or as exactly one JSON line when --json is given."""
    if as_json:  # strict JSON: NaN/inf (e.g. no validation split) become null
        click.echo(json.dumps(_finite(result), default=_jsonable, sort_keys=True, allow_nan=False))
    else:
        human(result)


def table(rows: list[list[Any]], header: list[str]) -> None:
    """Print `rows` under `header` in left-aligned columns two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return _finite(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Terminated(Exception):
    """Raised in the main thread on SIGTERM so that every `finally` (worker shutdown) runs."""


_GRACE_S = 15.0
_signalled: list[int] = []
_swallowed: list[bool] = []


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM stop the command cleanly, and for certain.

    The handler raises in the main thread so `finally` blocks stop the TFF worker. Python
    swallows that exception when the signal lands inside a garbage-collection callback (seen in
    jax's); the unraisable hook then re-delivers the signal. A watchdog ends the process after a
    grace period regardless, and a second signal ends it at once; the kernel then stops the
    worker (parent-death signal).
    """
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.unraisablehook = _unraisable


def _on_signal(signum: int, frame: object) -> None:
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    if _signalled and not _swallowed:
        _hard_exit(word, signum)
    if not _signalled:
        timer = threading.Timer(_GRACE_S, _hard_exit, args=(word, signum))
        timer.daemon = True
        timer.start()
        _signalled.append(signum)
    _swallowed.clear()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _unraisable(info: object) -> None:
    if _signalled and isinstance(info.exc_value, KeyboardInterrupt | Terminated):
        _swallowed.append(True)
        # deliver it again from another thread, so it lands outside this callback
        threading.Timer(0.05, os.kill, args=(os.getpid(), _signalled[0])).start()
        return
    sys.__unraisablehook__(info)


def _hard_exit(word: str, signum: int) -> None:
    sys.stderr.write(word + "\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def handle_errors(fn: Callable) -> Callable:
    """Turn UserError (and friends) into one line on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(143)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # an unexpected failure: still one line, the trace on --debug
            if _signalled:  # the signal's exception was re-wrapped (e.g. by autograph)
                word = "interrupted" if _signalled[0] == signal.SIGINT else "terminated"
                click.echo(word, err=True)
                sys.exit(128 + _signalled[0])
            if debug:
                raise
            click.echo(
                printable(
                    f"error: {type(e).__name__}: {_first_line(e)} (--debug shows the traceback)"
                ),
                err=True,
            )
            sys.exit(1)

    return wrapper


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
