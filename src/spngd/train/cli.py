"""``spngd``: the command line (``spngd train``, ``spngd compare``).

Every option is a :class:`TrainConfig` field (``--batch-size`` for ``batch_size``); options
left out take the defaults described in :mod:`spngd.train.config` (with ``--resume``: the
saved run's values). A user error prints one line ``spngd: error: ...`` to stderr and exits
with status 2; training stopped by NaN or inf the same way with status 3. Warnings print as
one line ``spngd: warning: ...`` each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from spngd.distributed import launch
from spngd.distributed.exchange import RankFailureError
from spngd.train import stopping
from spngd.train.compare import compare
from spngd.train.config import (
    COMPARE_DEFAULTS,
    DEFAULTS,
    NESTED,
    OPTIMIZER_DEFAULTS,
    OPTIMIZERS,
    RESUME_FIXED,
    TrainConfig,
    check_same_run,
    flag,
    knobs,
    knobs_of,
    resolve_config,
    resume_config,
)
from spngd.train.errors import Terminated, TrainingStoppedError, UserError
from spngd.train.runfolder import (
    CONFIG,
    Checkpoint,
    RunFolder,
    SilentRunFolder,
    find_checkpoint,
    holds_checkpoint,
    saved_options,
)
from spngd.train.trainer import device_of_this_rank, train

USER_ERROR = 2
TRAINING_STOPPED = 3
PER_OPTIMIZER = tuple(OPTIMIZER_DEFAULTS["spngd"])
"""Options ``compare`` takes per run, as ``--sgd-lr``, ``--spngd-lr`` and so on."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def _base_type(annotation: Any) -> type:
    """``int`` for ``int | None`` and so on."""
    if isinstance(annotation, types.UnionType):
        return next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def _default_text(name: str, defaults: dict[str, Any]) -> str:
    """`` (default: ...)`` for options whose default is fixed or set per optimizer."""
    if defaults.get(name) is not None:
        return f" (default: {defaults[name]})"
    if name in OPTIMIZER_DEFAULTS["spngd"]:
        values = ", ".join(f"{opt} {OPTIMIZER_DEFAULTS[opt][name]:g}" for opt in OPTIMIZERS)
        return f" (default: {values})"
    return ""


def _add_config_options(
    parser: argparse.ArgumentParser,
    skip: Sequence[str] = (),
    defaults: dict[str, Any] = DEFAULTS,
) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in fields(TrainConfig):
        if field.name in skip:
            continue
        if field.name in NESTED:
            add_nested_options(parser, field.name, NESTED[field.name])
            continue
        help_text = field.metadata["help"] + _default_text(field.name, defaults)
        value_type = _base_type(hints[field.name])
        if isinstance(hints[field.name], types.UnionType):  # ``X | None``: 'none' gives None
            metavar = _METAVARS.get(value_type, "NAME") + "|none"
            _add_option(parser, flag(field.name), _or_none(value_type), help_text, metavar=metavar)
        else:
            _add_option(parser, flag(field.name), value_type, help_text)


def _or_none(value_type: type) -> Callable[[str], Any]:
    """The parser of an optional value: ``value_type``, or None for the word ``none``."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else value_type(text)

    parse.__name__ = f"{value_type.__name__} or 'none'"
    return parse


def add_nested_options(parser: argparse.ArgumentParser, name: str, settings: type) -> None:
    """``--NAME-KNOB`` for every knob of a settings dataclass, its help and default its own."""
    hints = typing.get_type_hints(settings)
    defaults = knobs_of(settings())
    for knob in knobs(settings):
        value_type = _base_type(hints[knob.name])
        if typing.get_origin(value_type) is typing.Literal or "names" in knob.metadata:
            value_type = str
        help_text = f"{knob.metadata['help']} (default: {defaults[knob.name]})"
        option = flag(f"{name}_{knob.name}")
        _add_option(parser, option, value_type, help_text, dest=f"{name}.{knob.name}")


_METAVARS: dict[type, str] = {int: "N", float: "X"}


def _add_option(
    parser: argparse.ArgumentParser, option: str, value_type: type, help_text: str, **extra: Any
) -> None:
    options: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
    if value_type is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = value_type
        options["metavar"] = _METAVARS.get(value_type, "NAME")
    parser.add_argument(option, **(options | extra))


def nest(options: dict[str, Any]) -> dict[str, Any]:
    """The parsed options with ``refresh.alpha``-style entries gathered into ``refresh``."""
    nested: dict[str, Any] = {}
    for key, value in options.items():
        owner, _, knob = key.partition(".")
        if owner in NESTED:
            nested.setdefault(owner, {})[knob] = value
        else:
            nested[key] = value
    return nested


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spngd", description="Train image classifiers with SP-NGD or SGD.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="train one model (default: resnet20 with SP-NGD on the embedded digits)",
        description="Train one model and write a run folder (config, metrics, checkpoint, plot).",
    )
    _add_config_options(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest usable checkpoint; options given "
        f"override the saved ones, except {', '.join(map(flag, RESUME_FIXED))}",
    )
    compare = commands.add_parser(
        "compare",
        help="train with SGD and with SP-NGD on the same setup and plot both",
        description="Train with SGD and with SP-NGD into OUT/sgd and OUT/spngd; draw both "
        "runs into OUT/compare.png.",
    )
    _add_config_options(
        compare,
        skip=("optimizer", "distributed", *PER_OPTIMIZER),
        defaults={**DEFAULTS, **COMPARE_DEFAULTS},
    )
    for optimizer in OPTIMIZERS:
        own = OPTIMIZER_DEFAULTS[optimizer]
        for name in PER_OPTIMIZER:
            compare.add_argument(
                f"--{optimizer}-{name.replace('_', '-')}",
                dest=f"{optimizer}.{name}",
                type=float,
                default=argparse.SUPPRESS,
                metavar="X",
                help=f"{name.replace('_', ' ')} of the {optimizer} run (default: {own[name]:g})",
            )
    return parser


def _run_train(options: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as pending:
        config, checkpoint, restarting = _train_config(options)
    device = device_of_this_rank(config)
    with launch.process_group(device, config.dist_timeout) as (rank, world_size):
        folder = RunFolder if rank == 0 else SilentRunFolder  # rank 0 writes the run
        with folder(config.out, checkpoint, restarting=restarting) as run:
            for warning in pending:  # said of this run only once it is this process's
                warnings.showwarning(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
            result = train(config, run, checkpoint)
    stopping.ignore_further()  # the run is over: a late stop signal leaves its status as it is
    if rank == 0:
        ranks = f" on {world_size} ranks" if world_size > 1 else ""
        _report(
            f"{result.steps} steps{ranks} in {result.train_time:.1f} s, validation accuracy "
            f"{100 * result.val_accuracy:.2f}%; run folder {config.out}"
        )


def _train_config(options: dict[str, Any]) -> tuple[TrainConfig, Checkpoint | None, bool]:
    """The config of ``spngd train``, the checkpoint it resumes (if any), and whether it is
    the ``--resume`` of a run stopped before its first checkpoint (which starts again)."""
    checkpoint = None
    restarting = False
    if options.pop("resume"):
        if "out" not in options:
            raise UserError("--resume needs --out, the run folder to continue")
        folder = Path(options["out"])
        saved = None
        if folder.is_dir() and not holds_checkpoint(folder):
            try:
                saved = saved_options(folder)
            except UserError as error:
                raise UserError(f"--resume: {error}") from None
        if saved is not None:
            warnings.warn(
                f"{folder} holds no checkpoint (the run stopped before its first one): it "
                "starts again from its first step, with its saved options",
                RuntimeWarning,
                stacklevel=2,
            )
            config = resume_config(saved, options)
            restarting = True
        else:
            checkpoint = find_checkpoint(folder)
            _check_recorded_run(folder, checkpoint)
            config = resume_config(checkpoint.payload["config"], options)
    else:
        config = resolve_config(options)
    return config, checkpoint, restarting


def _report(*lines: str) -> None:
    """Print the summary of a finished run on stdout. A reader that has gone (``| head``
    closed the pipe) is no error; a stdout that cannot be written (``> /dev/full``) is one
    that says the run is complete. Either way stdout then goes to /dev/null, so that the
    interpreter's last flush does not fail again."""
    try:
        print(*lines, sep="\n", flush=True)
    except OSError as error:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(error, BrokenPipeError):
            raise UserError(
                f"cannot write to stdout ({error.strerror or error}); the run is complete"
            ) from None


def _check_recorded_run(folder: Path, checkpoint: Checkpoint) -> None:
    """A UserError when ``checkpoint`` belongs to another run than the one ``folder``'s
    config.json records. The checkpoint's options are the run's: config.json is a record,
    rewritten from them at every resume (a warning when it cannot be read)."""
    try:
        recorded = saved_options(folder)
    except UserError as error:
        recorded = str(error)
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        reason = (
            recorded
            if isinstance(recorded, str)
            else f"{folder / CONFIG} does not hold a run's options (a {type(recorded).__name__})"
        )
        warnings.warn(
            f"{reason}; it is written again from the checkpoint's options",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    check_same_run(checkpoint.path, checkpoint.payload["config"], recorded)


def _run_compare(options: dict[str, Any]) -> None:
    if launch.launched_world_size() > 1:
        raise UserError("spngd compare runs in one process; under torchrun use spngd train")
    own = {key: options.pop(key) for key in list(options) if "." in key}
    options = {**COMPARE_DEFAULTS, **options}
    out = Path(resolve_config(options).out)
    configs = {}
    for optimizer in OPTIMIZERS:
        mine = {key.split(".")[1]: v for key, v in own.items() if key.startswith(f"{optimizer}.")}
        try:
            configs[optimizer] = resolve_config(
                {**options, **mine, "optimizer": optimizer, "out": str(out / optimizer)}
            )
        except UserError as error:  # name the flag the user gave: --sgd-lr, not --lr
            message = str(error)
            for name in mine:
                message = re.sub(rf"^{flag(name)}\b", f"--{optimizer}-{flag(name)[2:]}", message)
            raise UserError(message) from None
    results = compare(configs, out)
    stopping.ignore_further()  # as in _run_train
    _report(
        *(
            f"{name}: {result.steps} steps in {result.train_time:.1f} s, "
            f"validation accuracy {100 * result.val_accuracy:.2f}%"
            for name, result in results.items()
        ),
        f"plot: {out / 'compare.png'}",
    )


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: typing.TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line, like the errors (no source location)."""
    print(f"spngd: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None, started_ignoring: frozenset[int] | None = None) -> int:
    """Run ``spngd`` with ``argv`` in this process and return the exit status. Ctrl-C,
    SIGTERM and the other stop signals stop the run with one line
    (:mod:`spngd.train.stopping`), except those in ``started_ignoring`` (default: those
    ignored now), which stay ignored; the caller's handlers are put back when it returns."""
    previous = stopping.install(started_ignoring)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            options = nest(vars(build_parser().parse_args(_with_command_first(argv))))
            command = options.pop("command")
            (_run_train if command == "train" else _run_compare)(options)
    except UserError as error:
        print(f"spngd: error: {error}", file=sys.stderr)
        return USER_ERROR
    except TrainingStoppedError as error:
        print(f"spngd: error: {error}", file=sys.stderr)
        return TRAINING_STOPPED
    except (KeyboardInterrupt, Terminated) as stop:
        return stopping.stopped(stop)
    except RankFailureError as error:
        first_line = str(error).strip().splitlines()[0].removeprefix("SPNGD: ")
        print(f"spngd: error: {first_line}", file=sys.stderr)
        return TRAINING_STOPPED
    except RuntimeError as error:
        stop = stopping.stop_behind(error)
        if stop is None:
            raise
        return stopping.stopped(stop)
    finally:
        stopping.restore(previous)
    return 0


def _with_command_first(argv: Sequence[str] | None) -> list[str]:
    """The arguments, or a UserError where they do not start with the command: none at all,
    or options before it (``spngd --epochs 3 train``), which argparse would report as a
    missing or invalid command."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or (arguments[0].startswith("-") and arguments[0] not in ("-h", "--help")):
        raise UserError(
            "a command comes first: spngd train [options] or spngd compare [options] (spngd --help)"
        )
    return arguments


def run() -> NoReturn:
    """The ``spngd`` console script: :func:`main`, with stop signals ignored around it, so
    that one coming once the run is over (its line printed, the interpreter exiting) leaves
    the run's exit status as it is instead of ending the process by the signal."""
    started_ignoring = stopping.ignore_further()
    stopping.exit_with(main(started_ignoring=started_ignoring))


if __name__ == "__main__":
    run()
