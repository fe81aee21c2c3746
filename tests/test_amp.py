"""The GradScaler's loss scale as a device tensor."""

from __future__ import annotations

import torch

from spngd.amp import inverse_loss_scale, reciprocal


def test_the_inverse_scale_is_exact_for_powers_of_two_in_the_asked_dtype() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    inverse = inverse_loss_scale(scaler, torch.device("cpu"), torch.float64)
    assert inverse.dtype == torch.float64 and inverse.shape == ()
    assert inverse.item() == 2.0**-16
    assert reciprocal(torch.tensor(2.0**24)).item() == 2.0**-24
    assert reciprocal(torch.tensor(3.0)).dtype == torch.float32


def test_no_scaler_or_a_disabled_one_means_no_scale() -> None:
    cpu = torch.device("cpu")
    assert inverse_loss_scale(None, cpu) is None
    assert inverse_loss_scale(torch.amp.GradScaler("cpu", enabled=False), cpu) is None
