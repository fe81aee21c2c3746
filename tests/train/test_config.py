"""Config resolution and validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from spngd.curvature import KroneckerBlock
from spngd.distributed import DistributedConfig
from spngd.refresh import AdaptiveRefresh
from spngd.train.config import (
    CPUS,
    DATA_DEFAULTS,
    DEFAULTS,
    MAX_PER_CPU,
    OPTIMIZER_DEFAULTS,
    SPNGD_DEFAULTS,
    resolve_config,
    resume_config,
)
from spngd.train.errors import UserError
from spngd.train.models import build_model
from spngd.train.optimizers import make_optimizer
from tests.train.conftest import write_image_folder


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


def test_image_folders_keep_a_batch_whose_activations_fit(tmp_path: Path) -> None:
    """The large default batch is the digits'; at 224 pixels it would not fit in memory."""
    root = write_image_folder(tmp_path / "images")
    folder = resolve_config({"data": str(root), "device": "cpu"})
    assert folder.batch_size == DATA_DEFAULTS["imagefolder"]["batch_size"] == 32
    assert resolve_config({"data": str(root), "batch_size": 8, "device": "cpu"}).batch_size == 8
    recipe = resolve_config({"data": str(root), "recipe": "imagenet-4k", "device": "cpu"})
    assert recipe.batch_size == 4096
    assert (
        resolve_config({"data": "synthetic", "device": "cpu"}).batch_size == DEFAULTS["batch_size"]
    )


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
        ({"threads": 100000}, f"--threads must be in 1..{MAX_PER_CPU * CPUS}, got 100000"),
        ({"threads": 0}, f"--threads must be in 1..{MAX_PER_CPU * CPUS}, got 0"),
        ({"workers": 10**6}, f"--workers must be in 0..{MAX_PER_CPU * CPUS}, got 1000000"),
        ({"batch_size": 30, "accumulate": 4}, "--batch-size 30 is not divisible by --accumulate 4"),
        ({"model": "resnet99"}, "--model must be one of resnet18"),
        ({"recipe": "imagenet-1k"}, "unknown recipe 'imagenet-1k'; valid: imagenet-4k"),
        ({"optimizer": "adam"}, "--optimizer must be one of spngd, sgd, got 'adam'"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"lr_decay_start": 3.0, "epochs": 2.0}, "--lr-decay-end must be > --lr-decay-start"),
        ({"damping_start": 0.1}, "--damping-start needs --damping-decay-epochs > 0"),
        ({"device": "tpu"}, "--device 'tpu' is not a torch device"),
        ({"epochs": float("inf")}, "--epochs must be finite"),
        ({"refresh": {"alpha": float("nan")}}, "--refresh-alpha must be a number, got nan"),
        ({"refresh": {"rule": "fast"}}, "--refresh-rule must be noise or threshold, got 'fast'"),
        (
            {"damping_form": "diagonal"},
            "--damping-form must be one of factored-keep-a, factored, kronecker, got 'diagonal'",
        ),
        ({"refresh": {"noise_margin": -0.5}}, "--refresh-noise-margin must be >= 0, got -0.5"),
        (
            {"refresh": {"noise_margin": float("nan")}},
            "--refresh-noise-margin must be >= 0, got nan",
        ),
        ({"refresh": {"shrink": "drop"}}, "--refresh-shrink must be halve or reset, got 'drop'"),
        ({"refresh": {"grow": "triple"}}, "--refresh-grow must be double or plus1, got 'triple'"),
        ({"refresh": {"max_interval": 0}}, "--refresh-max-interval must be a positive integer"),
        ({"refresh": {"warmup_steps": -1}}, "--refresh-warmup-steps must be >= 0, got -1"),
        (
            {"inverse_interval": 0, "stat_interval": 1},
            "--inverse-interval must be an int >= 1 or None, got 0",
        ),
        ({"stat_interval": 0}, "--stat-interval must be an int >= 1 or None, got 0"),
        ({"accumulate": 0}, "--accumulate must be an int >= 1, got 0"),
        ({"max_bad_steps": 0}, "--max-bad-steps must be an int >= 1, got 0"),
        ({"statistics_examples": 0}, "--statistics-examples must be an int >= 2 or None, got 0"),
        ({"a_examples": 1}, "--a-examples must be an int >= 2 or None, got 1"),
        (
            {"inverse_interval": 10},
            "--inverse-interval must be None without a fixed stat interval, got 10",
        ),
        ({"seed": 10**23}, "--seed must be in 0..2**63-1"),
        ({"device": "meta"}, "--device meta: spngd trains on cpu or cuda"),
        ({"image_size": 100_000}, "--image-size must be in 1..4096"),
        ({"warmup_epochs": float("inf")}, "--warmup-epochs must be finite"),
        ({"weight_decay": float("inf")}, "--weight-decay must be finite and >= 0, got inf"),
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


def test_refresh_options_reach_the_optimizer_and_old_configs_take_the_defaults() -> None:
    model = build_model("resnet20", num_classes=10)
    knobs = {
        "alpha": 0.5,
        "rule": "threshold",
        "noise_margin": 2.0,
        "grow": "plus1",
        "shrink": "reset",
        "max_interval": 8,
        "warmup_steps": 3,
        "pool": False,
    }
    config = resolve_config({"device": "cpu", "refresh": knobs})
    assert config.to_dict()["refresh"] == knobs  # config.json holds them as one setting
    opt = make_optimizer(model, config)
    assert opt.refresh.stat_interval is None
    assert opt.refresh.adaptive == AdaptiveRefresh(**knobs)  # type: ignore[arg-type]
    # a knob left out keeps AdaptiveRefresh's default
    partial = resolve_config({"device": "cpu", "refresh": {"alpha": 0.5}}).refresh
    assert partial == AdaptiveRefresh(alpha=0.5)
    fixed = resolve_config({"device": "cpu", "stat_interval": 10, "inverse_interval": 100})
    opt = make_optimizer(model, fixed)
    assert (opt.refresh.stat_interval, opt.refresh.inverse_interval) == (10, 100)
    # A run folder written before these options existed resumes with AdaptiveRefresh's
    # defaults.
    saved = resolve_config({"device": "cpu", "out": "runs/old"}).to_dict()
    for name in ("refresh", "inverse_interval"):
        del saved[name]
    opt = make_optimizer(model, resume_config(saved, {}))
    assert opt.refresh.adaptive == AdaptiveRefresh()


def test_distributed_options_reach_the_optimizer_and_config_json_holds_them_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import spngd.train.optimizers as optimizers

    given = {"comm_dtype": "bfloat16", "assignment": "equal_count", "overlap": False}
    config = resolve_config({"device": "cpu", "distributed": given})
    received: dict[str, object] = {}
    monkeypatch.setattr(optimizers, "SPNGD", lambda model, **settings: received.update(settings))
    make_optimizer(build_model("resnet20", num_classes=10), config)
    assert received["distributed"] == DistributedConfig(
        comm_dtype=torch.bfloat16, assignment="equal_count", overlap=False
    )
    saved = config.to_dict()
    assert saved["distributed"] == {**given, "bucket_elements": 1 << 22}
    assert json.loads(json.dumps(saved)) == saved  # config.json takes it as it is
    assert resume_config(saved, {}).distributed == config.distributed
    older = {key: value for key, value in saved.items() if key != "distributed"}
    assert resume_config(older, {}).distributed == DistributedConfig()
    for knobs, message in (
        ({"comm_dtype": "float8"}, "--distributed-comm-dtype must be one of float32, bfloat16"),
        ({"process_group": "world"}, "unknown option(s): --distributed-process-group"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_config({"device": "cpu", "distributed": knobs})


def test_resume_keeps_saved_refresh_knobs_the_user_does_not_give() -> None:
    """Knob by knob: --refresh-alpha on resume leaves the saved --refresh-rule alone, and a
    config.json with the flat ``refresh_rule``-style entries of older runs still loads."""
    saved = resolve_config(
        {"device": "cpu", "out": "runs/old", "refresh": {"rule": "threshold", "max_interval": 8}}
    ).to_dict()
    resumed = resume_config(saved, {"refresh": {"alpha": 0.5}})
    assert resumed.refresh == AdaptiveRefresh(alpha=0.5, rule="threshold", max_interval=8)
    flat = {key: value for key, value in saved.items() if key != "refresh"}
    flat |= {f"refresh_{knob}": value for knob, value in saved["refresh"].items()}
    assert resume_config(flat, {}).refresh == AdaptiveRefresh(rule="threshold", max_interval=8)
    flat["refresh_rule"] = "spec"  # the threshold rule's name in older runs
    assert resume_config(flat, {}).refresh == AdaptiveRefresh(rule="threshold", max_interval=8)
    older = {**saved, "refresh": {"rule": "spec"}}
    assert resume_config(older, {}).refresh == AdaptiveRefresh(rule="threshold")
    with pytest.raises(UserError, match=r"unknown option.*--refresh-speed"):
        resolve_config({"refresh": {"speed": 2}})


def test_statistics_examples_reach_the_blocks_and_old_runs_keep_every_example() -> None:
    model = build_model("resnet20", num_classes=10)
    for options, limit, a_limit in (
        ({}, SPNGD_DEFAULTS["statistics_examples"], SPNGD_DEFAULTS["a_examples"]),
        ({"statistics_examples": None, "a_examples": None}, None, None),
        ({"statistics_examples": 64}, 64, SPNGD_DEFAULTS["a_examples"]),
        ({"a_examples": 16}, SPNGD_DEFAULTS["statistics_examples"], 16),
    ):
        opt = make_optimizer(model, resolve_config({"device": "cpu", **options}))
        blocks = opt.curvature.values()
        assert {block.statistics_examples for block in blocks} == {limit}
        kronecker = [block for block in blocks if isinstance(block, KroneckerBlock)]
        assert kronecker and {block.a_examples for block in kronecker} == {a_limit}
        opt.remove_hooks()
    # a saved config without the settings computed statistics from every example
    saved = resolve_config({"device": "cpu", "out": "runs/old"}).to_dict()
    del saved["statistics_examples"], saved["a_examples"]
    assert resume_config(saved, {}).statistics_examples is None
    assert resume_config(saved, {}).a_examples is None
    assert resume_config(saved, {"statistics_examples": 256}).statistics_examples == 256


def test_damping_form_reaches_the_optimizer() -> None:
    for form in ("factored", "kronecker"):
        model = build_model("resnet20", num_classes=10)
        opt = make_optimizer(model, resolve_config({"device": "cpu", "damping_form": form}))
        forms = {block.damping_form for block in opt.curvature.values() if hasattr(block, "G")}
        assert forms == {form}


def test_a_data_folder_is_saved_absolute_so_the_run_resumes_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    saved = resolve_config({"data": "images", "device": "cpu"}).to_dict()
    assert saved["data"] == str(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resume_config(saved, {}).data == str(root)
    assert resume_config(saved, {"data": str(root) + "/"}).data == str(root)
    monkeypatch.chdir(tmp_path)
    assert resume_config(saved, {"data": "./images"}).data == str(root)
    with pytest.raises(UserError, match=r"--data digits differs from the saved run's"):
        resume_config(saved, {"data": "digits"})
    (tmp_path / "link").symlink_to(root)  # the same folder through a link
    assert resume_config(saved, {"data": "link"}).data == str(tmp_path / "link")
    for empty in ("", "  "):
        message = rf"^--data must be a data set name or a folder, got '{empty}'$"
        with pytest.raises(UserError, match=message):
            resume_config(saved, {"data": empty})
        with pytest.raises(UserError, match=message):
            resolve_config({"data": empty})
