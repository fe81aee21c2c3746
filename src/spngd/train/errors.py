"""The exception types the CLI prints as a single line: user errors and stopped training."""

from __future__ import annotations

import signal


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


class TrainingStoppedError(Exception):
    """Training cannot go on (NaN or inf for too many steps in a row, or in the model itself).

    ``spngd`` prints ``spngd: error: <message>`` and exits with status 3; the message names
    the last good checkpoint, which was not overwritten, to resume from.
    """


class Terminated(BaseException):
    """The process received a stop signal other than Ctrl-C's: SIGTERM (a scheduler's or
    torchrun's stop), SIGHUP (its terminal closed), SIGQUIT, SIGUSR1 or SIGUSR2 (a
    scheduler's warning before its time limit). Like Ctrl-C, the run stops where it is, its
    last checkpoint kept; ``signum`` is the signal's number."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum
