"""Stop signals: raised once, raised again when lost, the caller's handlers put back."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from spngd.train import stopping
from spngd.train.errors import Terminated


def test_a_stop_is_raised_once_and_again_when_lost() -> None:
    hook = sys.unraisablehook
    previous = stopping.install()
    try:
        stopping.raise_if_lost()  # nothing raised yet
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()  # not reached: the handler raises first
        os.kill(os.getpid(), signal.SIGINT)  # part of the stop: returns at once
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Terminated):
            stopping.raise_if_lost()
        assert stopping.stopped(Terminated()) == 143
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        stopping.restore(previous)
    assert signal.getsignal(signal.SIGINT) is previous.handlers[signal.SIGINT]
    assert sys.unraisablehook is hook
    stopping.raise_if_lost()  # the stop ended with its run: a trainer used next is not stopped


def test_an_error_raised_over_a_stop_is_the_stop() -> None:
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
    except RuntimeError as error:
        assert isinstance(stopping.stop_behind(error), KeyboardInterrupt)
    worker = RuntimeError("DataLoader worker (pid 11558) is killed by signal: Terminated. ")
    assert isinstance(stopping.stop_behind(worker), Terminated)
    assert stopping.stop_behind(RuntimeError("shape mismatch")) is None
