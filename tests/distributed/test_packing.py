"""Triangle packing and flat communication buffers, no processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spngd.curvature import KroneckerBlock
from spngd.distributed import (
    FlatPacker,
    TensorSpec,
    packed_numel,
    triu_pack,
    triu_unpack,
)
from spngd.distributed.packing import triu_indices
from spngd.train.models import build_model
from tests.distributed.shapes import model_blocks, real_block


def _symmetric(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    return x + x.transpose(-1, -2)


def _mixed() -> tuple[list[TensorSpec], list[torch.Tensor]]:
    """A bucket like one rank's: A and G of a grouped conv, a gradient, a BN Fisher, a scalar."""
    gen = torch.Generator().manual_seed(1)
    tensors = [
        _symmetric(2, 7, 7, seed=2),
        _symmetric(2, 3, 3, seed=3),
        torch.randn(6, 4, 3, 3, generator=gen),
        _symmetric(5, 2, 2, seed=4),
        torch.randn((), generator=gen),
        _symmetric(1, 1, seed=5),
    ]
    symmetric = [True, True, False, True, False, True]
    specs = [TensorSpec(t.shape, s) for t, s in zip(tensors, symmetric, strict=True)]
    return specs, tensors


@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (3, 4, 4), (2, 3, 6, 6)])
def test_triu_round_trip_exact(shape: tuple[int, ...]) -> None:
    m = _symmetric(*shape)
    d = shape[-1]
    packed = triu_pack(m)
    assert packed.shape == (*shape[:-2], d * (d + 1) // 2)
    assert torch.equal(triu_unpack(packed, d), m)


def test_triu_layout_and_upper_only() -> None:
    m = torch.arange(9.0).reshape(3, 3)  # not symmetric: only the upper triangle is read
    packed = triu_pack(m)
    assert packed.tolist() == [0.0, 1.0, 2.0, 4.0, 5.0, 8.0]
    upper = torch.triu(m)
    assert torch.equal(triu_unpack(packed, 3), upper + torch.triu(m, 1).T)


def test_triu_indices_cached() -> None:
    device = torch.device("cpu")
    assert triu_indices(4, device)[0] is triu_indices(4, device)[0]


def test_triu_errors() -> None:
    with pytest.raises(ValueError, match="d, d"):
        triu_pack(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="d=3"):
        triu_unpack(torch.zeros(5), 3)


def test_packed_numel() -> None:
    assert packed_numel((4, 5), symmetric=False) == 20
    assert packed_numel((), symmetric=False) == 1
    assert packed_numel((6, 6), symmetric=True) == 21
    assert packed_numel((3, 2, 2), symmetric=True) == 9
    with pytest.raises(ValueError, match="symmetric"):
        packed_numel((3, 4), symmetric=True)
    with pytest.raises(ValueError, match="symmetric"):
        TensorSpec((3,), symmetric=True)


def test_layout() -> None:
    specs, _ = _mixed()
    packer = FlatPacker(specs)
    lengths = [2 * 28, 2 * 6, 216, 5 * 3, 1, 1]
    assert len(packer) == 6
    assert packer.numel == sum(lengths)
    offset = 0
    for i, length in enumerate(lengths):
        assert packer.segment(i) == (offset, length)
        offset += length


def test_round_trip_float32_exact() -> None:
    specs, tensors = _mixed()
    packer = FlatPacker(specs)
    flat = packer.pack(tensors, torch.float32)
    assert flat.shape == (packer.numel,) and flat.dtype == torch.float32
    out = packer.unpack(flat, torch.float32)
    for got, want in zip(out, tensors, strict=True):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert torch.equal(got, want)
    flat.zero_()  # results are copies, not views of the buffer
    assert torch.equal(out[2], tensors[2]) and torch.equal(out[4], tensors[4])


@pytest.mark.parametrize(
    ("comm_dtype", "rtol"),
    [(torch.float32, 1e-7), (torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)],
)
def test_comm_dtype_precision(comm_dtype: torch.dtype, rtol: float) -> None:
    """Factors kept in float64 travel in ``comm_dtype``: one rounding, shape and symmetry kept."""
    specs, tensors = _mixed()
    tensors = [t.double() for t in tensors]
    packer = FlatPacker(specs)
    flat = packer.pack(tensors, comm_dtype)
    assert flat.dtype == comm_dtype
    for spec, got, want in zip(specs, packer.unpack(flat, torch.float64), tensors, strict=True):
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=rtol, atol=0)
        if spec.symmetric:
            assert torch.equal(got, got.transpose(-1, -2))


def test_sum_of_buffers_is_sum_of_tensors() -> None:
    """What an all-reduce relies on: packing is linear."""
    specs, tensors = _mixed()
    packer = FlatPacker(specs)
    doubled = packer.unpack(packer.pack(tensors, torch.float32) * 2, torch.float32)
    for got, want in zip(doubled, tensors, strict=True):
        assert torch.equal(got, 2 * want)


def test_segments_address_single_tensors() -> None:
    specs, tensors = _mixed()
    packer = FlatPacker(specs)
    flat = packer.pack(tensors, torch.float32)
    offset, length = packer.segment(1)
    flat[offset : offset + length] *= 3  # e.g. reduce only this part
    out = packer.unpack(flat, torch.float32)
    assert torch.equal(out[1], 3 * tensors[1])
    assert all(torch.equal(out[i], tensors[i]) for i in (0, 2, 3, 4, 5))


def test_pack_into_padded_buffer() -> None:
    """Two rank buckets in one equal-length-padded buffer, as an all-gather takes them."""
    specs, tensors = _mixed()
    buckets = [FlatPacker(specs[:2]), FlatPacker(specs[2:])]
    parts = [tensors[:2], tensors[2:]]
    width = max(b.numel for b in buckets)
    buffer = torch.zeros(2 * width, dtype=torch.bfloat16)
    for rank, (bucket, part) in enumerate(zip(buckets, parts, strict=True)):
        view = buffer[rank * width : rank * width + bucket.numel]
        assert bucket.pack(part, torch.bfloat16, out=view) is view
    for rank, (bucket, part) in enumerate(zip(buckets, parts, strict=True)):
        got = bucket.unpack(buffer[rank * width : rank * width + bucket.numel], torch.float32)
        for g, w in zip(got, part, strict=True):
            assert torch.allclose(g, w, rtol=2.0**-8, atol=0)


def test_empty_packer() -> None:
    packer = FlatPacker([])
    assert packer.numel == 0
    assert packer.pack([], torch.float16).shape == (0,)
    assert packer.unpack(torch.zeros(0), torch.float32) == []


def test_pack_errors() -> None:
    specs, tensors = _mixed()
    packer = FlatPacker(specs)
    with pytest.raises(ValueError, match="6 tensors for a packer of 5"):
        FlatPacker(specs[:5]).pack(tensors, torch.float32)
    with pytest.raises(ValueError, match="tensor 2"):
        packer.pack([*tensors[:2], tensors[2].reshape(6, 36), *tensors[3:]], torch.float32)
    with pytest.raises(ValueError, match="communication dtype"):
        packer.pack(tensors, torch.float64)
    with pytest.raises(ValueError, match="out must be"):
        packer.pack(tensors, torch.float32, out=torch.zeros(packer.numel, dtype=torch.float16))
    with pytest.raises(ValueError, match="flat buffer"):
        packer.unpack(torch.zeros(packer.numel + 1), torch.float32)


def test_resnet50_volumes() -> None:
    """Floats per step for ResNet-50 (FC with bias, bias-free convs)."""
    model = build_model("resnet50", 1000)
    gradients = FlatPacker([TensorSpec(p.shape) for p in model.parameters()])
    assert gradients.numel == 25_557_032

    factors, bn_stored, bn_2x2, bn_full = [], [], [], []
    unpacked = 0
    for block in model_blocks(model):
        if isinstance(block, KroneckerBlock):
            for d in (block.a_dim, block.g_dim):
                factors.append(TensorSpec((block.groups, d, d), symmetric=True))
                unpacked += block.groups * d * d
        else:
            c = block.channels  # type: ignore[attr-defined]
            bn_stored.append(TensorSpec((c, 3)))  # BatchNormBlock's (f_gg, f_gb, f_bb)
            bn_2x2.append(TensorSpec((c, 2, 2), symmetric=True))
            bn_full.append(TensorSpec((2 * c, 2 * c), symmetric=True))  # CVPR'19 variant
    fc = real_block("fc", next(m for m in model.modules() if isinstance(m, nn.Linear)))
    assert (fc.a_dim, fc.g_dim, fc.groups) == (2049, 1000, 1)  # type: ignore[union-attr]
    assert len(factors) == 2 * 54 and len(bn_stored) == 53
    assert FlatPacker(factors).numel == 76_967_027
    assert round(unpacked / 1e5) == 1539  # 153.9 M unpacked
    assert sum(spec.shape[0] for spec in bn_stored) == 26_560
    assert FlatPacker(bn_stored).numel == FlatPacker(bn_2x2).numel == 79_680
    assert FlatPacker(bn_full).numel == 56_444_864

    # The real gradients survive a float32 round trip through one 25.6 M-float buffer.
    params = [p.detach() for p in model.parameters()]
    restored = gradients.unpack(gradients.pack(params, torch.float32), torch.float32)
    assert all(torch.equal(r, p) for r, p in zip(restored, params, strict=True))
