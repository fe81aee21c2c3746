"""Checked settings: each owner states the rule of each of its settings once, and a caller
that names settings its own way (the CLI's ``--refresh-alpha``) reads which one failed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any

Rule = tuple[Callable[[Any], bool], str]
"""A test of a value and what it says in words (``"> 0"``)."""


class InvalidSettingError(ValueError):
    """A setting outside its range: ``setting`` names it, ``rule`` says what it must be."""

    def __init__(self, owner: str, setting: str, rule: str, value: object) -> None:
        super().__init__(f"{owner}.{setting} must be {rule}, got {value!r}")
        self.setting, self.rule, self.value = setting, rule, value


def setting(default: object, help_text: str, names: Mapping[str, Any] | None = None) -> Any:
    """A settings dataclass field with its ``help`` (the CLI's option help) and, for values
    the command line cannot give as they are (a ``torch.dtype``), ``names``: each value by
    the name an option gives and config.json holds. A field made without this function is
    not a command-line option."""
    metadata: dict[str, Any] = {"help": help_text}
    if names is not None:
        metadata["names"] = names
    return field(default=default, metadata=metadata)


def check(owner: str, values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """An :class:`InvalidSettingError` for the first of ``values`` its rule rejects; a value
    its rule cannot even compare (a string where a number belongs) is rejected too."""
    for setting, value in values.items():
        test, rule = rules[setting]
        try:
            accepted = bool(test(value))
        except (TypeError, ValueError):
            accepted = False
        if not accepted:
            raise InvalidSettingError(owner, setting, rule, value)


def int_rule(minimum: int) -> Rule:
    """The rule of a setting that is an int (not a bool) of at least ``minimum``."""
    return (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
        f"an int >= {minimum}",
    )


def optional_int_rule(minimum: int) -> Rule:
    """:func:`int_rule`, or None."""
    test, rule = int_rule(minimum)
    return (lambda v: v is None or test(v), f"{rule} or None")
