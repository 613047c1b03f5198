"""The one exception type users see: a message that names the file and the problem."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed precondition the user can fix.

    The CLI prints ``str(error)`` as one line on stderr and exits with code 2 (no traceback).
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else printable(str(path))
        super().__init__(printable(f"{self.path}: {message}" if self.path else message))


def printable(text: str) -> str:
    """``text`` safe to print on any terminal: a file name's undecodable bytes (which Python
    keeps as lone surrogates, e.g. ``site\udcffB``) are shown escaped (``site\\xffB``)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")
