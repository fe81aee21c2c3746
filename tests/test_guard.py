"""The NaN/inf step guard shared by SPNGD and the trainer's SGD."""

from __future__ import annotations

import pytest
import torch

from spngd.guard import GuardedSteps, NonFiniteGradientError, NonFiniteGuard, any_nonfinite


def test_any_nonfinite_sees_one_bad_entry_among_many_tensors() -> None:
    grads = [torch.ones(3, 4), torch.zeros(5), torch.full((2,), 1e30)]
    assert any_nonfinite(grads).item() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [g.clone() for g in grads]
        broken[1][3] = bad
        assert any_nonfinite(broken).item() == 1.0
    assert any_nonfinite([]).item() == 0.0


def test_any_nonfinite_needs_a_bad_entry() -> None:
    """The largest finite values, many of them, are not mistaken for an overflow; infinities
    of both signs in different tensors are not cancelled; half precision is read alike."""
    largest = torch.finfo(torch.float32).max
    assert any_nonfinite([torch.full((1000,), largest), torch.full((7,), largest)]).item() == 0.0
    infinities = [torch.tensor([float("inf")]), torch.tensor([-float("inf")])]
    assert any_nonfinite(infinities).item() == 1.0
    half = torch.full((4,), torch.finfo(torch.float16).max, dtype=torch.float16)
    assert any_nonfinite([half]).item() == 0.0
    half[2] = float("nan")
    assert any_nonfinite([half]).item() == 1.0
    complex_grad = torch.complex(torch.ones(2), torch.tensor([0.0, float("nan")]))
    assert any_nonfinite([complex_grad]).item() == 1.0
    assert any_nonfinite([complex_grad.real]).item() == 0.0


def test_bad_steps_are_skipped_counted_and_stop_after_too_many_in_a_row() -> None:
    guard = NonFiniteGuard("SGD", max_bad_steps=3, advice="Lower the learning rate")
    with pytest.warns(
        RuntimeWarning, match=r"SGD: NaN or inf gradient; step skipped \(1 in a row, 1 in all\)"
    ):
        assert guard.skip(True)
    assert not guard.skip(False)  # a good step ends the run of bad ones
    with pytest.warns(RuntimeWarning) as caught:
        assert guard.skip(True) and guard.skip(True)
    assert [str(w.message)[-22:] for w in caught] == [
        "(1 in a row, 2 in all)",
        "(2 in a row, 3 in all)",
    ]
    with pytest.raises(
        NonFiniteGradientError, match=r"SGD: 3 steps in a row .* Lower the learning rate, and"
    ):
        guard.skip(True)
    assert guard.state_dict() == {"skipped_steps": 4, "bad_steps_in_a_row": 3}


def test_counters_round_trip_through_an_optimizer_state_dict() -> None:
    guard = NonFiniteGuard("SPNGD", 10, "x")
    state = {"skipped_steps": 5, "bad_steps_in_a_row": 2, "other": 1}
    guard.pop_state(state)
    assert (guard.skipped_steps, guard.bad_steps_in_a_row) == (5, 2) and state == {"other": 1}


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_max_bad_steps_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="max_bad_steps must be an int >= 1"):
        NonFiniteGuard("x", bad, "y")  # type: ignore[arg-type]


def test_guarded_steps_reports_the_guard() -> None:
    class Stepper(GuardedSteps):
        guard = NonFiniteGuard("x", 5, "y")

    stepper = Stepper()
    assert not stepper.last_step_skipped and stepper.skipped_steps == 0
    with pytest.warns(RuntimeWarning):
        stepper.guard.skip(True)
    assert stepper.last_step_skipped and stepper.skipped_steps == 1
    stepper.guard.skip(False)
    assert not stepper.last_step_skipped and stepper.skipped_steps == 1
