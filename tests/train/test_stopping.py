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
    worker = RuntimeError("DataLoader worker (pid 11558) is killed by signal: Hangup. ")
    assert getattr(stopping.stop_behind(worker), "signum", None) == signal.SIGHUP
    killed = RuntimeError("DataLoader worker (pid 11558) is killed by signal: Killed. ")
    assert stopping.stop_behind(killed) is None  # the OOM killer's SIGKILL is no stop
    assert stopping.stop_behind(RuntimeError("shape mismatch")) is None


@pytest.mark.parametrize(
    ("signum", "line"),
    [
        (signal.SIGHUP, "spngd: terminated (SIGHUP)\n"),
        (signal.SIGQUIT, "spngd: terminated (SIGQUIT)\n"),
        (signal.SIGUSR1, "spngd: terminated (SIGUSR1)\n"),
        (signal.SIGUSR2, "spngd: terminated (SIGUSR2)\n"),
    ],
)
def test_every_signal_that_ends_a_process_stops_the_run_with_its_name(
    signum: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    previous = stopping.install()
    try:
        with pytest.raises(Terminated) as stop:
            os.kill(os.getpid(), signum)
            signal.pause()
        assert stop.value.signum == signum
        assert stopping.stopped(stop.value) == 128 + signum  # as a shell reports the signal
    finally:
        stopping.restore(previous)
    assert capsys.readouterr().err == line
