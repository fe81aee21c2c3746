"""The paper's ImageNet presets."""

from __future__ import annotations

import pytest

from spngd.train.config import resolve_config
from spngd.train.recipes import RECIPES


def test_every_batch_size_of_the_paper_has_a_preset_under_the_paper_s_name() -> None:
    assert {name: r.batch_size for name, r in RECIPES.items()} == {
        "imagenet-4k": 4_096,
        "imagenet-8k": 8_192,
        "imagenet-16k": 16_384,
        "imagenet-32k": 32_768,
        "imagenet-65k": 65_536,
        "imagenet-131k": 131_072,
    }


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_preset_sets_its_row_and_what_all_rows_share(name: str) -> None:
    """ResNet-50, SP-NGD, no warm-up, weight decay, label smoothing or running average of
    statistics, weight rescaling and mixup for all epochs, the row's numbers."""
    recipe = RECIPES[name]
    config = resolve_config({"recipe": name, "data": "synthetic", "device": "cpu"})
    assert (config.model, config.optimizer, config.batch_size) == (
        "resnet50",
        "spngd",
        recipe.batch_size,
    )
    assert (config.lr, config.momentum, config.damping) == (
        recipe.lr,
        recipe.momentum,
        recipe.damping,
    )
    assert (config.warmup_epochs, config.weight_decay, config.stat_decay) == (0.0, 0.0, 0.0)
    assert config.rescale_weights and config.mixup_off_epoch is None
    assert config.mixup_alpha == recipe.mixup_alpha and config.label_smoothing == 0.0


def test_options_given_with_a_preset_win() -> None:
    config = resolve_config(
        {"recipe": "imagenet-32k", "data": "synthetic", "device": "cpu", "lr": 0.5, "epochs": 3}
    )
    assert config.lr == 0.5 and config.epochs == 3 and config.batch_size == 32_768
