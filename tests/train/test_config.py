"""Config resolution and validation."""

from __future__ import annotations

import pytest
import torch

from spngd.train.config import DEFAULTS, OPTIMIZER_DEFAULTS, resolve_config
from spngd.train.errors import UserError


def test_defaults_resolve_to_concrete_values() -> None:
    config = resolve_config({"device": "cpu"})
    assert config.data == "digits" and config.model == "resnet20" and config.optimizer == "spngd"
    assert (
        config.batch_size == DEFAULTS["batch_size"]
        and config.lr == OPTIMIZER_DEFAULTS["spngd"]["lr"]
    )
    assert config.lr_decay_end == config.epochs
    assert (config.crop, config.flip, config.image_size, config.workers) == ("none", False, 8, 0)
    assert config.out.startswith("runs/")


def test_precedence_recipe_over_defaults_and_options_over_recipe() -> None:
    config = resolve_config(
        {"recipe": "imagenet-4k", "data": "synthetic", "lr": 0.5, "device": "cpu"}
    )
    assert config.batch_size == 4096 and config.momentum == 0.997 and config.lr == 0.5
    sgd = resolve_config(
        {"recipe": "imagenet-4k", "data": "synthetic", "optimizer": "sgd", "device": "cpu"}
    )
    assert sgd.batch_size == 4096 and sgd.lr_decay_end == 53  # the recipe's schedule
    assert (
        sgd.lr == OPTIMIZER_DEFAULTS["sgd"]["lr"]
        and sgd.momentum == OPTIMIZER_DEFAULTS["sgd"]["momentum"]
    )
    assert sgd.warmup_epochs == OPTIMIZER_DEFAULTS["sgd"]["warmup_epochs"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
        ({"batch_size": 30, "accumulate": 4}, "--batch-size 30 is not divisible by --accumulate 4"),
        ({"model": "resnet99"}, "--model must be one of resnet18"),
        ({"recipe": "imagenet-1k"}, "unknown recipe 'imagenet-1k'; valid: imagenet-4k"),
        ({"optimizer": "adam"}, "--optimizer must be one of spngd, sgd, got 'adam'"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"lr_decay_start": 3.0, "epochs": 2.0}, "--lr-decay-end must be > --lr-decay-start"),
        ({"damping_start": 0.1}, "--damping-start needs --damping-decay-epochs > 0"),
        ({"device": "tpu"}, "--device 'tpu' is not a torch device"),
        ({"epochs": float("inf")}, "--epochs must be finite"),
    ],
)
def test_bad_values_are_user_errors_naming_the_flag(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(UserError) as error:
        resolve_config({"device": "cpu", **options})
    assert str(error.value).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--device cuda: CUDA is not available on this machine"):
        resolve_config({"device": "cuda"})
