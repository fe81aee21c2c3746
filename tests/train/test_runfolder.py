"""The run folder's files: atomic writes, the lock, refusing a folder that holds a run,
finding the newest usable checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spngd.train.errors import UserError
from spngd.train.runfolder import (
    CHECKPOINT,
    PREVIOUS,
    RunFolder,
    atomic_write,
    find_checkpoint,
)
from spngd.train.runfolder import (
    CHECKPOINT_FIELDS as FIELDS,
)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(file: object) -> None:
        file.write(b"half")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail, previous=tmp_path / "file.prev")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "file.bin"
    ]
    atomic_write(path, lambda f: f.write(b"new"), previous=tmp_path / "file.prev")
    assert path.read_bytes() == b"new" and (tmp_path / "file.prev").read_bytes() == b"old"


def test_a_folder_in_use_or_holding_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with RunFolder(tmp_path / "run"):
        with pytest.raises(UserError, match="is in use by another spngd process"):
            RunFolder(tmp_path / "run")
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"x")
    with pytest.raises(UserError, match="already holds a run; choose another --out"):
        RunFolder(tmp_path / "run")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--out .*file is a file, not a folder"):
        RunFolder(tmp_path / "file")


def test_the_newest_usable_checkpoint_is_found_and_the_rejected_named(tmp_path: Path) -> None:
    good = {key: (kind[0] if isinstance(kind, tuple) else kind)() for key, kind in FIELDS.items()}
    good |= {"model": {"w": torch.ones(2)}, "step": 7}
    torch.save(good, tmp_path / PREVIOUS)
    (tmp_path / CHECKPOINT).write_bytes(b"torn")
    found = find_checkpoint(tmp_path)
    assert found.path == tmp_path / PREVIOUS and found.step == 7
    assert [path.name for path, _ in found.rejected] == [CHECKPOINT]
    torch.save(good | {"model": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / PREVIOUS)
    with pytest.raises(UserError, match=r"no usable checkpoint in .*the model holds NaN or inf"):
        find_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        find_checkpoint(tmp_path / "empty")
