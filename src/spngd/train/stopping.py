"""Ctrl-C, SIGTERM and the other stop signals: how ``spngd`` stops a run, once, with one line.

A stop signal raises ``KeyboardInterrupt`` (Ctrl-C) or :class:`Terminated` (SIGTERM,
SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2: each ends a process by default) in the run, once: later
ones return at once, so that a stop already unwinding through clean-ups is not cut short. A
library can swallow that exception (a bare ``except:`` around an import, a finalizer, whose
errors Python only reports); the trainer calls :func:`raise_if_lost` before each step,
which raises it again. Once the stop reaches the command line (:func:`stopped`), or the run
is over, further signals are ignored through the interpreter's exit, so that none turns the
run's status into a death by the signal.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from spngd.train.errors import Terminated

STOPPING_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
STOPPED_STATUSES = frozenset(128 + signum for signum in STOPPING_SIGNALS)
"""The exit status of a run stopped by each signal, as a shell reports a process the signal
ended: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
_SIGNAL_OF_DESCRIPTION = {signal.strsignal(signum): signum for signum in STOPPING_SIGNALS[1:]}
WORKER_STOPPED = re.compile(
    r"DataLoader worker \(pid \d+\) is killed by signal: "
    f"({'|'.join(map(re.escape, _SIGNAL_OF_DESCRIPTION))})"
)
"""How torch reports a DataLoader worker that a stop signal to the process group ended
("... is killed by signal: Terminated")."""

_MAIN_PROCESS = os.getpid()
_raised: int | None = None
"""The signal of the stop raised in this run, if any."""


@dataclass(frozen=True)
class Previous:
    """What :func:`install` replaced: the signals' handlers and ``sys.unraisablehook``."""

    handlers: dict[int, Callable[[int, types.FrameType | None], object] | int | None]
    unraisablehook: Callable[[sys.UnraisableHookArgs], object]


def install(started_ignoring: frozenset[int] | None = None) -> Previous:
    """Make the stop signals stop the run (no stop raised yet); returns what they did
    before, for :func:`restore`. The signals the process was started ignoring
    (``started_ignoring``; by default, those ignored now) stay ignored: ``nohup`` ignores
    SIGHUP so that a run outlives its terminal, and a shell starts a background job
    (``spngd train &`` in a script) ignoring SIGINT and SIGQUIT."""
    global _raised
    _raised = None
    hook = sys.unraisablehook
    if started_ignoring is None:
        started_ignoring = ignored_now()
    handlers = {
        signum: _interrupt if signum == signal.SIGINT else _terminate
        for signum in STOPPING_SIGNALS
        if signum not in started_ignoring
    }
    return Previous(
        {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}, hook
    )


def ignored_now() -> frozenset[int]:
    """The stop signals this process ignores now."""
    return frozenset(s for s in STOPPING_SIGNALS if signal.getsignal(s) == signal.SIG_IGN)


def restore(previous: Previous) -> None:
    """Put back what :func:`install` replaced, and forget the run's stop (the run, stopped
    or not, is over: a trainer used afterwards in this process has nothing to raise)."""
    global _raised
    _raised = None
    for signum, handler in previous.handlers.items():
        if handler is not None:  # None: set outside Python, where signal.signal cannot
            signal.signal(signum, handler)
    sys.unraisablehook = previous.unraisablehook


def ignore_further() -> frozenset[int]:
    """Ignore the stop signals from now on, through the interpreter's exit (a key held
    down, a scheduler that signals twice or late); returns those ignored already."""
    already = ignored_now()
    for signum in STOPPING_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    return already


def raise_if_lost() -> None:
    """Raise the stop again if one was raised and the run still goes on: something between
    the signal and here swallowed it."""
    if _raised is not None:
        raise _stop(_raised)


def stopped(stop: BaseException) -> int:
    """Print the one line of a run stopped by Ctrl-C (status 130) or another stop signal
    (``spngd: terminated (SIGTERM)``, status 143 for it); further stop signals are ignored.
    A stderr that is gone (SIGHUP: the terminal closed) loses the line, not the status."""
    ignore_further()
    sys.unraisablehook = _drop
    signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
    name = signal.Signals(signum).name
    line = "interrupted" if signum == signal.SIGINT else f"terminated ({name})"
    try:
        print(f"spngd: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass
    return 128 + signum


def exit_with(status: int) -> NoReturn:
    """End the process with ``status``. A stopped run's (:data:`STOPPED_STATUSES`) ends
    without the interpreter's own exit: CPython ends a process by
    SIGINT, whatever its status, when a KeyboardInterrupt ever ended code that ``exec`` ran
    from a string (a dataclass or namedtuple being made during an import), even one caught
    later, as the stop was. Its garbage is collected first, so that the data loaders shut
    their workers down (quietly, as during the stop)."""
    if status not in STOPPED_STATUSES:
        sys.exit(status)
    sys.unraisablehook = _drop
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # its reader is gone (SIGHUP)
            pass
    os._exit(status)


def stop_behind(error: BaseException) -> BaseException | None:
    """The stop signal's exception that ``error`` was raised while handling, if any: a clean-up
    interrupted by the stop (``torch.save`` closing its file, a DataLoader finding its
    workers gone) raises its own error over it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt | Terminated):
            return seen
        worker = WORKER_STOPPED.match(str(seen))
        if worker:  # the signal reached a worker first
            return Terminated(_SIGNAL_OF_DESCRIPTION[worker.group(1)])
        seen = seen.__cause__ or seen.__context__
    return None


def _drop(unraisable: sys.UnraisableHookArgs) -> None:
    """After a stop signal, errors Python cannot raise are dropped: with Ctrl-C or SIGTERM to
    the whole process group the DataLoader workers are gone too, and the loaders' clean-up
    reports each one ("Exception ignored in ... worker killed by signal"), which is not news."""


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise_stop(signum: int) -> None:
    global _raised
    if _raised is not None:
        return
    _raised = signum
    sys.unraisablehook = _drop
    raise _stop(signum)


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    """Ctrl-C: stop the run (KeyboardInterrupt), once."""
    if os.getpid() != _MAIN_PROCESS:
        raise KeyboardInterrupt  # a DataLoader worker: torch ends it quietly
    _raise_stop(signal.SIGINT)


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    """SIGTERM and the other stop signals: stop the run like Ctrl-C. DataLoader workers
    (forked with this handler, and signalled too when a scheduler stops the whole process
    group) leave quietly."""
    if os.getpid() != _MAIN_PROCESS:
        os._exit(128 + signum)
    _raise_stop(signum)
