"""K-FAC for ``nn.Conv1d``: a 1-D convolution is a 2-D one on images of height 1.

A length-``L`` input ``(n, C, L)`` is the image ``(n, C, 1, L)`` and a kernel of size
``k`` is ``(1, k)`` (stride, padding and dilation likewise act along the width only), so
the patches, their row order ``(c_in, k)`` (that of ``weight.view(c_out, -1)``) and both
factors are those of :class:`~spngd.curvature.conv.Conv2dBlock` on that image; padding
other than symmetric zeros is applied along the length before the view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spngd.curvature.base import statistics_dtype
from spngd.curvature.conv import Conv2dBlock
from spngd.curvature.kronecker import KroneckerBlock


class Conv1dBlock(Conv2dBlock):
    method = "K-FAC Conv1d"
    module_types = (nn.Conv1d,)
    unbatched_dims = 2

    def __init__(self, name: str, module: nn.Conv1d) -> None:
        KroneckerBlock.__init__(self, name, module)
        padding = module.padding
        self._set_geometry(
            module,
            (1, module.kernel_size[0]),
            (1, module.stride[0]),
            (0, padding[0]) if isinstance(padding, tuple) else padding,
            (1, module.dilation[0]),
        )

    def _prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.to(statistics_dtype(inputs))
        if self.explicit_pad is not None:
            x = F.pad(x, self.explicit_pad, mode=self.pad_mode)
        return x.unsqueeze(2)

    def g_factors(self, grad_output: torch.Tensor, batch_size: int, parts: int) -> torch.Tensor:
        return super().g_factors(grad_output.unsqueeze(2), batch_size, parts)
