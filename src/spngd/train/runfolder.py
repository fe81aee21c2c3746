"""The files of one run: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (with the one
before it, ``checkpoint.prev.pt``) and ``plot.png``.

All writes of a run go through :class:`RunFolder`, so a distributed run can give the ranks
other than 0 a folder that writes nothing. Checkpoints are replaced atomically and the
previous one is kept; :func:`find_checkpoint` picks the newest that loads and validates,
for ``--resume``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from spngd.guard import any_nonfinite
from spngd.messages import first_sentence
from spngd.train.errors import UserError
from spngd.train.plots import plot_runs

CONFIG, METRICS, PLOT = "config.json", "metrics.jsonl", "plot.png"
CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"
LOCK = ".lock"
"""Held (``flock``) by the process writing the run, so that a second one is refused."""
TEMPORARY = ".tmp"
"""Suffix of :func:`atomic_write`'s temporary files (``.NAME.RANDOM.tmp``)."""
SET_ASIDE = ".bad"
"""Suffix an unusable checkpoint is renamed to when a run resumes from an older one."""
CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizer": dict,
    "config": dict,
    "step": int,
    "passes": int,
    "train_time": float,
    "wall_time": float,
    "val_loss": float,
    "val_accuracy": float,
    "data_order": (torch.Tensor, type(None)),
    "ranks": list,
}
"""What a checkpoint holds (``Trainer.checkpoint``): a file lacking one is not resumed from."""


def atomic_write(
    path: Path, write: Callable[[IO[bytes]], None], previous: Path | None = None
) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync'd, then renamed.

    With ``previous``, an existing ``path`` is first renamed to ``previous``. A crash or error
    at any point leaves the old file or the new one (between the two renames: the old one as
    ``previous``), never a torn one. On error the temporary file is removed; a killed process
    leaves it behind, and :class:`RunFolder` removes it when the run resumes.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if previous is not None:
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, previous)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # make the renames themselves durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that loaded and validated, and the newer files that did not (with why)."""

    path: Path
    payload: dict[str, Any]
    rejected: tuple[tuple[Path, str], ...] = ()

    @property
    def step(self) -> int:
        return self.payload["step"]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (tensors and plain values only) and validate it.

    Raises whatever loading raises, or ValueError for a payload that lacks a field or whose
    model holds NaN or inf.
    """
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError(f"holds a {type(payload).__name__}, not a checkpoint")
    for key, expected_type in CHECKPOINT_FIELDS.items():
        if not isinstance(payload.get(key), expected_type):
            raise ValueError(f"no valid {key!r} entry")
    if not all_finite(payload["model"]):
        raise ValueError("the model holds NaN or inf")
    return payload


def all_finite(state: Mapping[str, Any]) -> bool:
    """Whether every floating-point tensor of a model's ``state_dict`` is free of NaN and inf
    (:func:`~spngd.guard.any_nonfinite`: one sum per tensor, no host sync per tensor)."""
    tensors = [t for t in state.values() if torch.is_tensor(t) and t.is_floating_point()]
    return not bool(any_nonfinite(tensors))


def holds_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint file (usable or not): a run there has
    something to lose."""
    return any(path.exists() for path in (folder / CHECKPOINT, folder / PREVIOUS)) or any(
        folder.glob(f"{CHECKPOINT}*.bad")
    )


def saved_options(folder: Path) -> Any:
    """The options of the run in ``folder`` (its ``config.json``), None without one; a
    UserError naming the file when it cannot be read or is not JSON."""
    try:
        return json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {folder / CONFIG} ({first_sentence(error)})") from None


def find_checkpoint(folder: Path) -> Checkpoint:
    """The newest checkpoint in ``folder`` that loads and validates: ``checkpoint.pt``, else
    ``checkpoint.prev.pt``. Reads only; a UserError when neither is usable."""
    if not folder.is_dir():
        raise UserError(f"--resume: run folder {folder} does not exist")
    rejected: list[tuple[Path, str]] = []
    for path in (folder / CHECKPOINT, folder / PREVIOUS):
        try:
            return Checkpoint(path, load_checkpoint(path), tuple(rejected))
        except FileNotFoundError:
            rejected.append((path, "missing"))
        except Exception as error:  # any failure to load makes the file unusable
            rejected.append((path, first_sentence(error)))
    if all(reason == "missing" for _, reason in rejected):
        raise UserError(
            f"--resume: {folder} holds no checkpoint ({CHECKPOINT} is written after each pass "
            "over the data)"
        )
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in rejected)
    raise UserError(f"--resume: no usable checkpoint in {folder} ({reasons})")


class RunFolder:
    """Creates the run folder (refusing one that holds a run, unless resuming it, or one
    that is a file) and writes its files, readable as the umask allows.

    Resuming from ``resume``: newer checkpoints that did not load are renamed to
    ``NAME.bad`` (so that the next save does not rotate one into ``checkpoint.prev.pt``,
    over a good one), each with a one-line warning; temporary files left by a killed save
    are removed; ``metrics.jsonl`` keeps its records up to the checkpoint's step (in
    :attr:`history`) and is appended to.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        resume: Checkpoint | None = None,
        resumable: bool = True,
        restarting: bool = False,
    ) -> None:
        self.path = Path(path)
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        """The folders ``mkdir`` makes for this run, deepest first."""
        self._wrote = False
        """Whether this run wrote a record, checkpoint or plot (else :meth:`close` removes
        what it created)."""
        try:
            if self.path.exists() and not self.path.is_dir():
                raise UserError(f"--out {self.path} is a file, not a folder")
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
            self._lock = open(self.path / LOCK, "a")  # held until close()
        except OSError as error:
            raise UserError(
                f"output folder {self.path} is not writable ({error.strerror or error})"
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(
                f"output folder {self.path} is in use by another spngd process"
            ) from None
        try:
            self._open(resume, resumable, restarting)
        except BaseException:
            self._release()
            raise

    def _open(self, resume: Checkpoint | None, resumable: bool, restarting: bool) -> None:
        self.history: list[dict[str, Any]] = []
        if resume is None:
            if holds_checkpoint(self.path):
                raise UserError(
                    f"output folder {self.path} already holds a run; choose another --out"
                    + (" (or --resume it)" if resumable else "")
                )
            if (self.path / METRICS).exists() and not restarting:
                warnings.warn(
                    f"output folder {self.path} holds a run stopped before its first "
                    "checkpoint; it is started again",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            self._set_aside(resume)
            for leftover in self.path.glob(f".*{TEMPORARY}"):
                leftover.unlink(missing_ok=True)
            with self._writing(METRICS):
                self.history = self._keep_metrics(resume.step)
        self._new = resume is None and not restarting
        with self._writing(METRICS):
            self._metrics = open(self.path / METRICS, "a" if resume else "w", buffering=1)

    def _set_aside(self, resume: Checkpoint) -> None:
        for path, reason in resume.rejected:
            if path.exists():
                os.replace(path, path.with_name(path.name + SET_ASIDE))
                problem = f"is unusable ({reason}, kept as {path.name}{SET_ASIDE})"
            else:
                problem = "is missing (the run was killed while saving?)"
            warnings.warn(
                f"checkpoint {path} {problem}; resuming from {resume.path.name} at step "
                f"{resume.step}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _keep_metrics(self, step: int) -> list[dict[str, Any]]:
        """Drop the records of ``metrics.jsonl`` past ``step`` (and a last line a crash tore:
        one without its newline that is not a record); return the records kept. A line that
        is not a record (a note written by hand) is kept where it is, with one warning:
        nothing the user wrote is lost."""
        try:
            text = (self.path / METRICS).read_text(errors="surrogateescape")
        except FileNotFoundError:
            text = ""
        lines = text.splitlines()
        kept: list[dict[str, Any]] = []
        kept_lines: list[str] = []
        odd: list[int] = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            record_step = record.get("step") if isinstance(record, dict) else None
            if isinstance(record_step, int):
                if record_step <= step:
                    kept.append(record)  # type: ignore[arg-type]
                    kept_lines.append(line)
            elif number == len(lines) and not text.endswith("\n"):
                continue  # torn by a crash while it was written
            elif line.strip():
                odd.append(number)
                kept_lines.append(line)
        if odd:
            warnings.warn(
                f"{self.path / METRICS}: line(s) {', '.join(map(str, odd[:5]))} are not "
                "records; kept as they are",
                RuntimeWarning,
                stacklevel=3,
            )
        text = "".join(line + "\n" for line in kept_lines)
        atomic_write(
            self.path / METRICS, lambda file: file.write(text.encode(errors="surrogateescape"))
        )
        return kept

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A failed write of a run file (a full disk, a lost permission) is a UserError."""
        try:
            yield
        except OSError as error:
            raise UserError(
                f"cannot write {self.path / name} ({error.strerror or error}); {self._kept(error)}"
            ) from None

    def _kept(self, error: OSError) -> str:
        """What a failed write leaves to resume from, for its one-line error."""
        if (self.path / CHECKPOINT).exists():
            return "the last checkpoint is kept"
        if not self.path.is_dir():
            return "the run folder is gone"
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return "the run has no checkpoint yet; rerun it with more room"
        return "the run has no checkpoint yet"

    def close(self) -> None:
        """Close the run's files. A new run stopped before its first record (refused: a
        batch larger than the data, a bad image, a batch too small for BatchNorm) leaves
        nothing behind: its empty ``metrics.jsonl`` and its ``config.json`` go, and the
        folders this run created."""
        try:
            with self._writing(METRICS):
                self._metrics.close()
        finally:
            self._release()
        if not self._new or self._wrote:
            return
        with contextlib.suppress(OSError):  # not empty: someone else's files stay
            (self.path / METRICS).unlink(missing_ok=True)
            (self.path / CONFIG).unlink(missing_ok=True)
            for folder in self._created:
                folder.rmdir()

    def _release(self) -> None:
        with contextlib.suppress(OSError):  # a folder made read-only or removed meanwhile
            (self.path / LOCK).unlink(missing_ok=True)
        self._lock.close()

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def write_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2) + "\n"
        with self._writing(CONFIG):
            atomic_write(self.path / CONFIG, lambda file: file.write(text.encode()))

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed, so it can be followed live)."""
        self._wrote = True
        with self._writing(METRICS):
            self._metrics.write(json.dumps(dict(record)) + "\n")

    def save_checkpoint(self, payload: Mapping[str, Any]) -> None:
        """Replace ``checkpoint.pt`` atomically, the old one becoming ``checkpoint.prev.pt``;
        on failure both stay as they were. Tensors are saved from the CPU, so the file
        loads on any machine."""
        self._wrote = True
        path = self.path / CHECKPOINT
        on_cpu = _to_cpu(dict(payload))
        try:
            atomic_write(path, lambda file: torch.save(on_cpu, file), previous=self.path / PREVIOUS)
        except (OSError, RuntimeError) as error:
            reason = os_error_behind(error)
            if reason is None:
                raise
            raise UserError(
                f"cannot write checkpoint {path} ({reason.strerror or reason}); "
                f"{self._kept(reason)}"
            ) from None

    def plot(self, records: Sequence[Mapping[str, Any]], title: str) -> None:
        self._wrote = True
        with self._writing(PLOT):
            plot_runs({"": records}, self.path / PLOT, title)


class SilentRunFolder:
    """What ranks other than 0 of a distributed run write: nothing (rank 0 writes the run)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        resume: Checkpoint | None = None,
        restarting: bool = False,
    ) -> None:
        self.path = Path(path)
        self.history: list[dict[str, Any]] = []

    def __enter__(self) -> SilentRunFolder:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def write_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def save_checkpoint(self, payload: Mapping[str, Any]) -> None:
        pass

    def plot(self, records: Sequence[Mapping[str, Any]], title: str) -> None:
        pass


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside dicts, lists and tuples moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that caused ``error`` (itself, or one in its chain), if any: ``torch.save``
    reports a failed write (a full disk, a file size limit) as a RuntimeError raised while
    handling the OSError."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
