"""A layer called twice per forward under ``overlap=True`` (docs/troubleshooting.md):
its statistics would arrive after they were sent, so SPNGD raises, suggesting overlap=False."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from spngd import SPNGD
from spngd.distributed import DistributedConfig
from tests.distributed.harness import run_workers


class Reused(nn.Module):
    """``hidden`` is applied twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(torch.tanh(self.hidden(x)))))


def _worker(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(Reused())
    opt = SPNGD(model, lr=0.1, distributed=DistributedConfig(overlap=True, bucket_elements=1))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    try:
        F.cross_entropy(model(x), y).backward()
    except RuntimeError as error:
        Path(out, f"rank{rank}.txt").write_text(str(error))
    opt.zero_grad()  # waits for the reductions already started


def test_a_layer_called_twice_under_overlap_is_a_clear_error(tmp_path: Path) -> None:
    run_workers(_worker, 2, str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "'hidden' recorded statistics after they were sent to its owner" in message
        assert "Use DistributedConfig(overlap=False)" in message
