"""The GradScaler's loss scale as a device tensor."""

from __future__ import annotations

import torch

from spngd.amp import inverse_loss_scale, reciprocal


def test_the_inverse_scale_is_exact_for_powers_of_two_in_the_asked_dtype() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    like = torch.zeros(3, dtype=torch.float64)
    inverse = inverse_loss_scale(scaler, like)
    assert inverse.dtype == torch.float64 and inverse.shape == ()
    assert inverse.item() == 2.0**-16
    assert reciprocal(torch.tensor(2.0**24)).item() == 2.0**-24
    assert reciprocal(torch.tensor(3.0)).dtype == torch.float32


def test_no_scaler_or_a_disabled_one_means_no_scale() -> None:
    like = torch.zeros(1)
    assert inverse_loss_scale(None, like) is None
    assert inverse_loss_scale(torch.amp.GradScaler("cpu", enabled=False), like) is None
