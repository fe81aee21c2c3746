"""Text for one-line errors, shared by the library and the CLI."""

from __future__ import annotations


def first_sentence(error: BaseException) -> str:
    """The first sentence of ``error``'s first line, or its type's name: torch's load,
    state-dict and collective messages run on for many lines, too long for the parenthesis
    of a one-line error."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(error).__name__
