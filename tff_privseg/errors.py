"""The one exception type users see: a message that names the file and the problem."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed precondition the user can fix.

    The CLI prints ``str(error)`` as one line on stderr and exits with code 2 (no traceback).
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
