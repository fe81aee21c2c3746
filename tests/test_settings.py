"""Checked settings: rules stated once, errors that name the setting."""

from __future__ import annotations

import pytest

from spngd.settings import InvalidSettingError, check, int_rule, optional_int_rule


def test_the_first_rejected_value_names_its_owner_setting_rule_and_value() -> None:
    rules = {"a": int_rule(1), "b": int_rule(2)}
    check("Owner", {"a": 1, "b": 2}, rules)
    with pytest.raises(InvalidSettingError) as raised:
        check("Owner", {"a": 1, "b": 1}, rules)
    error = raised.value
    assert str(error) == "Owner.b must be an int >= 2, got 1"
    assert (error.setting, error.rule, error.value) == ("b", "an int >= 2", 1)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None])
def test_int_rule_takes_only_ints_at_or_above_its_minimum(value: object) -> None:
    test, _ = int_rule(1)
    assert test(1) and test(7)
    assert not test(value)


def test_optional_int_rule_also_takes_none() -> None:
    test, rule = optional_int_rule(2)
    assert test(None) and test(2)
    assert not test(1) and not test(False)
    assert rule == "an int >= 2 or None"


def test_a_value_its_rule_cannot_compare_is_rejected_by_name() -> None:
    rules = {"rate": ((lambda v: v > 0), "> 0")}
    with pytest.raises(InvalidSettingError, match=r"^Owner.rate must be > 0, got '0.1'$"):
        check("Owner", {"rate": "0.1"}, rules)
