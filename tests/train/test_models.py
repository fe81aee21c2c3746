"""Tests for the plain-PyTorch ResNet definitions in ``spngd.train.models``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spngd.train.models import MODEL_NAMES, ResidualBlock, build_model, spatial_dims

IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50")
CIFAR_MODELS = ("resnet20", "resnet32", "resnet56")
SEQUENCE_MODELS = ("resnet8-1d", "resnet20-1d")


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _blocks(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_model_names() -> None:
    assert MODEL_NAMES == IMAGENET_MODELS + CIFAR_MODELS + SEQUENCE_MODELS
    assert [spatial_dims(name) for name in MODEL_NAMES] == [2] * 6 + [1] * 2


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_are_the_cifar_layout_in_one_dimension(name: str) -> None:
    """Conv1d and BatchNorm1d where the image model has Conv2d and BatchNorm2d, with the
    same channels and kernel sizes."""
    model = build_model(name, num_classes=10, in_channels=1)
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv1d, nn.BatchNorm1d} <= kinds and not {nn.Conv2d, nn.BatchNorm2d} & kinds
    if name == "resnet20-1d":
        image = build_model("resnet20", num_classes=10, in_channels=1)
        shapes_1d = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv1d)]
        shapes_2d = [m.weight.shape for m in image.modules() if isinstance(m, nn.Conv2d)]
        assert shapes_1d == [shape[:-1] for shape in shapes_2d]
    with torch.no_grad():
        out = model(torch.randn(4, 1, 40))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert len(_blocks(model)) == (3 if name == "resnet8-1d" else 9)


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        # ImageNet counts are those of torchvision's resnet18/34/50.
        ("resnet18", 1000, 11_689_512),
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        # CIFAR counts with projection shortcuts (option B); ~0.27M for ResNet-20.
        ("resnet20", 10, 272_474),
        ("resnet32", 10, 466_906),
        ("resnet56", 10, 855_770),
    ],
)
def test_parameter_count(name: str, num_classes: int, expected: int) -> None:
    assert _num_params(build_model(name, num_classes)) == expected


@pytest.mark.parametrize(
    ("name", "size"),
    [(n, 64) for n in IMAGENET_MODELS] + [(n, 8) for n in CIFAR_MODELS] + [("resnet20", 32)],
)
def test_output_shape(name: str, size: int) -> None:
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_imagenet_resolution() -> None:
    model = build_model("resnet18", num_classes=1000).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_in_channels(name: str) -> None:
    model = build_model(name, num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_all_relus_are_inplace() -> None:
    relus = [m for m in build_model("resnet50", 10).modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
def test_default_init(name: str) -> None:
    model = build_model(name, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    # He-normal (fan_out): std = sqrt(2 / (out_channels * k * k)).
    conv = model.stem[0]
    expected_std = (2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.2)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
@pytest.mark.parametrize("train", [False, True])
def test_zero_init_residual(name: str, train: bool) -> None:
    model = build_model(name, num_classes=10, zero_init_residual=True).train(train)
    blocks = _blocks(model)
    assert len(blocks) > 0
    for block in blocks:
        assert torch.count_nonzero(block.last_bn.weight) == 0

    inputs: dict[ResidualBlock, torch.Tensor] = {}
    for block in blocks:
        block.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0].clone()))
    size = 32 if name in IMAGENET_MODELS else 8
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
        assert len(inputs) == len(blocks)
        for block in blocks:
            x = inputs[block]
            expected = torch.relu(block.shortcut(x))
            torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


def test_zero_init_residual_off_by_default() -> None:
    for block in _blocks(build_model("resnet20", num_classes=10)):
        assert torch.count_nonzero(block.last_bn.weight) == block.last_bn.weight.numel()


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model("resnet101", num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(("name", "size"), [("resnet20", 8), ("resnet50", 32)])
def test_backward(name: str, size: int) -> None:
    model = build_model(name, num_classes=10, zero_init_residual=True)
    x = torch.randn(2, 3, size, size)
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (2,)))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert model.fc.weight.grad.abs().sum() > 0
    assert model.stem[0].weight.grad.abs().sum() > 0
