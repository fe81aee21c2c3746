"""The loss scale of a ``torch.amp.GradScaler``, read without a host synchronisation."""

from __future__ import annotations

import torch


def inverse_loss_scale(
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """``1 / scale`` of ``scaler`` as a 0-dim tensor of ``dtype`` on ``device``, or None
    without an enabled scaler.

    ``scaler.scale`` of a one stays on the device, where ``get_scale()`` would read the
    scale to the host; the reciprocal is taken in float64, as ``GradScaler.unscale_``
    does, so a power-of-two scale comes out exactly.
    """
    if scaler is None or not scaler.is_enabled():
        return None
    scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device))
    return reciprocal(scale).to(dtype)


def reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale`` in float32, through float64 as ``GradScaler.unscale_`` takes it (exact
    for the power-of-two scales a GradScaler uses)."""
    return scale.double().reciprocal().float()
