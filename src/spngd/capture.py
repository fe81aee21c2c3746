"""Hooks that hand each preconditioned module's input and output gradient to its block.

A forward hook keeps a detached reference to the layer input (autograd saves it anyway,
so this costs no memory; it is let go once the statistics are taken) and what the block
reads from the forward besides
(:meth:`~spngd.curvature.base.CurvatureBlock.forward_context`: BatchNorm's batch mean and
1/std), and registers a hook on the layer's *output tensor*. When that
tensor's gradient arrives, the block computes its statistics. Tensor hooks rather than
``register_full_backward_hook`` because they survive in-place operations on the output
(``ReLU(inplace=True)``, ``out += shortcut``): a hook registered before an in-place op
receives the gradient of the value the layer produced.

Nothing is recorded for evaluation passes (``torch.no_grad()`` or ``module.eval()``) or
on steps where the refresh policy wants none of a block's statistics (no hook, no
reference kept);
a forward that is never followed by backward leaves nothing behind once its graph is
freed; a module called several times contributes one pair per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from spngd.amp import inverse_loss_scale
from spngd.curvature import CurvatureBlock
from spngd.curvature.base import statistics_dtype
from spngd.timing import StageTimes


class StatisticsCapture:
    """Installs and owns the hooks of a set of curvature blocks.

    With ``sampled_only`` (MC Fisher) statistics are taken only in
    :meth:`record_sampled`, i.e. from the backward of the sampled-label loss; the
    ordinary backward then produces the gradient alone. Output gradients are multiplied
    by ``grad_scale`` before the statistics are taken (it undoes a known scaling of the
    loss, e.g. ``1 / accumulation_steps``) and divided by the loss scale of
    ``grad_scaler``; the sampled loss is a plain mean, scaled by ``grad_scaler`` only.
    ``on_recorded(name)`` is called after each recorded pair, so that communication can
    start during backward. Statistics are computed in at least float32 and outside any
    autocast region the backward runs in.
    """

    def __init__(
        self,
        blocks: Iterable[CurvatureBlock],
        sampled_only: bool,
        grad_scale: float,
        grad_scaler: torch.amp.GradScaler | None,
        times: StageTimes,
        on_recorded: Callable[[str], None],
    ) -> None:
        self.sampled_only = sampled_only
        self.grad_scale = grad_scale
        self.grad_scaler = grad_scaler
        self.times = times
        self.on_recorded = on_recorded
        self._recorded = 0
        self._sampling = False
        self._handles: list[RemovableHandle] = [
            block.module.register_forward_hook(self._forward_hook(block)) for block in blocks
        ]

    def _forward_hook(self, block: CurvatureBlock) -> Callable[..., None]:
        # Run eagerly under torch.compile: traced, Dynamo would guard on ``block.to_compute``
        # and recompile whenever the refresh switches a layer's statistics on or off.
        @torch.compiler.disable
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            if not (module.training and torch.is_grad_enabled() and any(block.to_compute)):
                return
            if not (inputs and isinstance(inputs[0], torch.Tensor)):
                return
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            # Held until the output's gradient arrives, then let go: the graph (and this
            # hook) lives to the end of backward, and holding the input that long would keep
            # its memory from being reused by the rest of the backward, where autograd frees
            # it once the layer's backward has used it (docs/performance.md).
            held = [(inputs[0].detach(), block.forward_context(output))]

            def on_output_grad(grad: torch.Tensor) -> None:
                if not held or (self.sampled_only and not self._sampling):
                    return
                saved_input, context = held.pop()
                block.accumulate(
                    saved_input, grad.detach(), self.times, self._grad_factor(grad), context
                )
                self._recorded += 1
                self.on_recorded(block.name)

            output.register_hook(on_output_grad)

        return hook

    def take_recorded_count(self) -> int:
        """Pairs recorded since the last call (the optimizer's check that statistics came)."""
        count, self._recorded = self._recorded, 0
        return count

    def _grad_factor(self, grad: torch.Tensor) -> float | torch.Tensor:
        """What turns ``grad`` into the output gradient of the unscaled mean loss.

        The ordinary backward's loss was divided by ``grad_scale``; the sampled loss of
        :meth:`record_sampled` was not. Both carry the GradScaler's loss scale, which stays
        on the device (:func:`spngd.amp.inverse_loss_scale`), in the statistics dtype.
        """
        factor: float | torch.Tensor = 1.0 if self._sampling else float(self.grad_scale)
        inverse_scale = inverse_loss_scale(self.grad_scaler, grad.device, statistics_dtype(grad))
        return factor if inverse_scale is None else inverse_scale * factor

    def record_sampled(self, loss: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        """Backpropagate a sampled-label ``loss`` (MC Fisher) to ``inputs`` to record
        statistics, keeping the graph; scaled by the GradScaler, so that a half-precision
        backward does not underflow (the hooks divide the scale out again)."""
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            loss = scaler.scale(loss)
        self._sampling = True
        try:
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
