"""The CLI's one-line errors."""

from __future__ import annotations

from spngd.train.errors import UserError


def test_a_user_error_from_a_dataloader_worker_keeps_its_message_only() -> None:
    """A worker's exception comes back as ``UserError(<the worker's traceback>)``: the
    message printed is the traceback's last line without the exception's name."""
    worker_traceback = (
        "Caught UserError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "data.py", line 3, in __getitem__\n'
        "spngd.train.errors.UserError: cannot decode image a.png (truncated); remove it\n"
    )
    assert str(UserError(worker_traceback)) == "cannot decode image a.png (truncated); remove it"
    assert str(UserError("plain message")) == "plain message"
