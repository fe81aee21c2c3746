"""Text for one-line errors."""

from __future__ import annotations

from spngd.messages import first_sentence


def test_first_sentence_is_the_first_sentence_of_the_first_line() -> None:
    error = RuntimeError("unexpected pos 1234 vs 1000. More detail follows.\nline two")
    assert first_sentence(error) == "unexpected pos 1234 vs 1000"
    assert first_sentence(OSError()) == "OSError"
