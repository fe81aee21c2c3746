"""Stop signals: raised once, raised again when lost, the caller's handlers put back."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pytest

from spngd.train import stopping
from spngd.train.errors import Terminated


@pytest.fixture(autouse=True)
def stop_signals_as_in_a_terminal() -> Iterator[None]:
    """Each test starts with the stop signals' default actions (Python's KeyboardInterrupt
    for SIGINT), as a command run in a terminal's foreground does, whatever the test run
    itself inherited (a background job starts ignoring SIGINT and SIGQUIT)."""
    defaults = {signum: signal.SIG_DFL for signum in stopping.STOPPING_SIGNALS}
    defaults[signal.SIGINT] = signal.default_int_handler
    before = {signum: signal.signal(signum, handler) for signum, handler in defaults.items()}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


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


def test_a_signal_the_process_was_started_ignoring_stays_ignored() -> None:
    """``nohup`` ignores SIGHUP so that the run outlives its terminal: the run keeps it
    ignored, and so does what the run puts back."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        previous = stopping.install()
        try:
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing is raised
            stopping.raise_if_lost()
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        finally:
            stopping.restore(previous)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
