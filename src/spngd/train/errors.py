"""The one exception type for problems a user can fix; the CLI prints it as a single line."""

from __future__ import annotations


class UserError(Exception):
    """A bad option, missing or unreadable data, or an unusable output folder.

    ``spngd`` prints ``spngd: error: <message>`` to stderr and exits with status 2, without a
    traceback: the message alone, one line, must say what is wrong and where.
    """

    def __init__(self, message: str) -> None:
        # A DataLoader worker's exception comes back as ``UserError(<worker traceback>)``;
        # the traceback's last line is ``spngd.train.errors.UserError: <message>``.
        last_line = message.strip().splitlines()[-1]
        super().__init__(last_line.removeprefix(f"{__name__}.{type(self).__qualname__}: "))
