"""The training configuration: one validated record, resolved from defaults, data, optimizer,
recipe and the user's options.

Precedence, lowest first: :data:`DEFAULTS`, :data:`DATA_DEFAULTS` for the data's kind,
:data:`OPTIMIZER_DEFAULTS` for the chosen optimizer, the ``--recipe`` preset, then every
option the user gave. A recipe's optimizer-specific values (learning rate, momentum,
warm-up, weight decay) are SP-NGD's, so an SGD run does not take them.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from spngd.distributed import DistributedConfig
from spngd.optimizer import GROUP_SETTINGS, SPNGD, check_settings
from spngd.preconditioner import FISHER_TYPES
from spngd.refresh import AdaptiveRefresh
from spngd.settings import InvalidSettingError
from spngd.train import mnist1d
from spngd.train.data import data_kind
from spngd.train.errors import UserError
from spngd.train.evaluation import BATCHNORM_STATISTICS
from spngd.train.models import MODEL_NAMES, spatial_dims
from spngd.train.recipes import RECIPES

OPTIMIZERS = ("spngd", "sgd")
OPTIMIZER_SETTINGS = {
    **{name: name for name in GROUP_SETTINGS},
    **{
        name: name
        for name in (
            "stat_decay",
            "fisher",
            "damping_form",
            "stat_interval",
            "inverse_interval",
            "statistics_examples",
            "a_examples",
            "a_patches",
            "max_bad_steps",
        )
    },
    "accumulate": "accumulation_steps",
}
"""Fields that are SPNGD's settings, each with SPNGD's name for it: checked by its rules
(``spngd.optimizer.SETTING_RULES``)."""
CROPS = ("none", "pad", "resized")


def _help(text: str) -> Any:
    return field(metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run uses; ``config.json`` in the run folder is this record."""

    data: str = _help(
        "'digits' (embedded), 'mnist1d' or 'mnist1d:SIZE' (generated), 'synthetic', a CIFAR-10 "
        "or an ImageFolder folder"
    )
    model: str = _help(f"one of {', '.join(MODEL_NAMES)}")
    zero_init_residual: bool = _help("start each residual block's last BatchNorm gamma at 0")
    optimizer: str = _help("spngd or sgd")
    recipe: str | None = _help(f"the paper's ImageNet preset: {', '.join(RECIPES)} (default: none)")
    epochs: float = _help("training length in epochs (may be fractional)")
    batch_size: int = _help(
        "examples per optimizer step (all micro-batches together; image folders: 32)"
    )
    accumulate: int = _help("micro-batches per step (gradient and statistics accumulation)")
    lr: float = _help("peak learning rate")
    warmup_epochs: float = _help("linear learning-rate warm-up length (0: none)")
    lr_decay_start: float = _help("epoch where the polynomial decay starts")
    lr_decay_end: float = _help("epoch where the learning rate reaches 0 (default: --epochs)")
    lr_decay_power: float = _help("power of the polynomial decay")
    momentum: float = _help("momentum (PyTorch form)")
    damping: float = _help("SP-NGD damping (the final value with --damping-start)")
    damping_start: float | None = _help(
        "initial damping, moving log-linearly to --damping (default: none, constant damping)"
    )
    damping_decay_epochs: float = _help("epochs over which damping moves from its start")
    weight_decay: float = _help("L2 weight decay added to the gradient")
    stat_decay: float = _help("SP-NGD running-average weight of old statistics")
    stat_interval: int | None = _help("SP-NGD statistics every k steps (default: adaptive)")
    inverse_interval: int | None = _help(
        "SP-NGD inverses every k steps, with --stat-interval (default: with the statistics)"
    )
    statistics_examples: int | None = _help(
        "SP-NGD curvature statistics from at most this many examples of each micro-batch "
        "(none: all)"
    )
    a_examples: int | None = _help(
        "SP-NGD's A (Linear and Conv inputs' second moment) from at most this many of the "
        "statistics' examples (none: as many as the other statistics)"
    )
    a_patches: int | None = _help(
        "SP-NGD's A of a Conv layer from the fewest of those examples that hold this many "
        "patches (examples x output locations), two at least (none: from all of them)"
    )
    refresh: AdaptiveRefresh = field(
        metadata={"help": "SP-NGD's adaptive refresh, one --refresh-* option per knob"}
    )
    fisher: str = _help(f"SP-NGD Fisher: {', '.join(FISHER_TYPES)}")
    damping_form: str = _help(
        "SP-NGD damping of Linear and Conv layers: 'factored-keep-a' (pi-corrected per factor, "
        "pi recomputed when A is refreshed), 'factored' (pi at every inversion) or 'kronecker' "
        "(exact, (G ⊗ A + damping I)^-1 in the factors' eigenbases)"
    )
    rescale_weights: bool = _help("shrink conv/Linear weights to norm sqrt(2 d_out) each step")
    mixup_alpha: float = _help("running mixup Beta(alpha, alpha) (0: off)")
    mixup_off_epoch: float | None = _help("epoch from which mixup is off (default: never)")
    label_smoothing: float = _help("label smoothing mass")
    crop: str = _help(f"training crop: {', '.join(CROPS)} (default: by data)")
    flip: bool = _help("random horizontal flips (default: by data)")
    image_size: int = _help("side of the square training image (default: by data)")
    workers: int = _help("DataLoader worker processes (default: by data)")
    eval_every_steps: int = _help("validate every k steps (0: after each pass over the data)")
    eval_batchnorm: str = _help(
        "BatchNorm statistics for validation: 'recomputed' before each validation from a fixed "
        "sample of training examples under the current weights, or 'running' (torch's running "
        "averages)"
    )
    max_bad_steps: int = _help("stop after this many steps in a row with NaN or inf gradients")
    seed: int = _help("random seed (model, shuffling, augmentation)")
    threads: int | None = _help("torch CPU threads (default: torch's choice)")
    device: str = _help(
        "cpu, cuda, cuda:N (default: cuda when available; under torchrun, cuda is the GPU of "
        "each process's LOCAL_RANK)"
    )
    dist_timeout: float = _help(
        "under torchrun, seconds a collective waits for the other ranks before the run stops"
    )
    distributed: DistributedConfig = field(
        metadata={"help": "SP-NGD under torchrun, one --distributed-* option per knob"}
    )
    out: str = _help("run folder (default: runs/<timestamp>)")
    progress: bool = _help("show the progress bar")

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("model", self.model in MODEL_NAMES, f"one of {', '.join(MODEL_NAMES)}"),
            ("crop", self.crop in CROPS, f"one of {', '.join(CROPS)}"),
            (
                "eval_batchnorm",
                self.eval_batchnorm in BATCHNORM_STATISTICS,
                f"one of {', '.join(BATCHNORM_STATISTICS)}",
            ),
            ("epochs", self.epochs > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
            ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
            ("lr_decay_start", self.lr_decay_start >= 0, ">= 0"),
            ("lr_decay_end", self.lr_decay_end > self.lr_decay_start, "> --lr-decay-start"),
            ("lr_decay_power", self.lr_decay_power > 0, "> 0"),
            ("damping_start", self.damping_start is None or self.damping_start > 0, "> 0"),
            ("damping_decay_epochs", self.damping_decay_epochs >= 0, ">= 0"),
            ("mixup_alpha", self.mixup_alpha >= 0, ">= 0"),
            ("mixup_off_epoch", self.mixup_off_epoch is None or self.mixup_off_epoch >= 0, ">= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("image_size", 1 <= self.image_size <= MAX_IMAGE_SIZE, f"in 1..{MAX_IMAGE_SIZE}"),
            ("seed", 0 <= self.seed < 2**63, "in 0..2**63-1"),
            ("workers", 0 <= self.workers <= MAX_PER_CPU * CPUS, f"in 0..{MAX_PER_CPU * CPUS}"),
            ("eval_every_steps", self.eval_every_steps >= 0, ">= 0"),
            (
                "threads",
                self.threads is None or 1 <= self.threads <= MAX_PER_CPU * CPUS,
                f"in 1..{MAX_PER_CPU * CPUS}",
            ),
            ("dist_timeout", 0 < self.dist_timeout < math.inf, "a positive number of seconds"),
            ("out", self.out.strip() != "", "a folder name"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{flag(name)} must be {rule}, got {getattr(self, name)!r}")
        try:  # SPNGD's own rules (SGD's values obey the same ones)
            check_settings(**{own: getattr(self, name) for name, own in OPTIMIZER_SETTINGS.items()})
        except InvalidSettingError as error:
            raise flag_error(error) from None
        check_optimizer(self.optimizer)
        recipe_settings(self.recipe)
        _check_device(self.device)
        sequences = mnist1d.is_named(self.data)
        if spatial_dims(self.model) != (1 if sequences else 2):
            one_d = ", ".join(name for name in MODEL_NAMES if spatial_dims(name) == 1)
            wanted = f"a 1-D model ({one_d})" if sequences else "an image model"
            raise UserError(f"--model {self.model} does not fit --data {self.data}: use {wanted}")
        if self.batch_size % self.accumulate:
            raise UserError(
                f"--batch-size {self.batch_size} is not divisible by --accumulate {self.accumulate}"
            )
        if self.damping_start is not None and self.damping_decay_epochs <= 0:
            raise UserError("--damping-start needs --damping-decay-epochs > 0")
        for name in ("epochs", "lr_decay_end", "warmup_epochs"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{flag(name)} must be finite, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """The config as config.json holds it: nested settings as their knobs, each a value
        its option would give (a dtype by its name)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: knobs_of(v) if name in NESTED else v for name, v in values.items()}


def recipe_settings(name: str | None) -> dict[str, Any]:
    """The values a ``--recipe`` preset sets (none without one); UserError for a bad name."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[name].settings()


def check_optimizer(name: str) -> None:
    """A UserError unless ``name`` is one of :data:`OPTIMIZERS` (checked before its defaults
    are looked up, and by the config itself)."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


CPUS = os.cpu_count() or 1
MAX_PER_CPU = 4
"""``--threads`` and ``--workers`` go up to this many per CPU of the machine: more gains
nothing, and far more makes torch crash (100,000 threads), stall (3,000) or fill the memory
with workers (1,000 on 2 CPUs)."""


MAX_IMAGE_SIZE = 4096
"""Largest ``--image-size``: far above ImageNet's 224, far below what fills a machine."""


def _check_device(device: str) -> None:
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: spngd trains on cpu or cuda")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def flag_error(error: InvalidSettingError, prefix: str = "") -> UserError:
    """A library setting's error, naming the flag that set it (``prefix`` + its name, or the
    field that holds the optimizer setting of that name)."""
    field_of = {own: name for name, own in OPTIMIZER_SETTINGS.items()}
    name = prefix + error.setting if prefix else field_of.get(error.setting, error.setting)
    return UserError(f"{flag(name)} must be {error.rule}, got {error.value!r}")


SPNGD_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(SPNGD).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}
"""SPNGD's own defaults (its signature), which the training config takes as they are."""

DEFAULTS: dict[str, Any] = {
    "data": "digits",
    "model": "resnet20",
    "zero_init_residual": False,
    "optimizer": "spngd",
    "recipe": None,
    "epochs": 40.0,
    "batch_size": 1024,
    "accumulate": 1,
    "lr_decay_start": 0.0,
    "lr_decay_power": 2.0,
    "damping": 3e-3,
    "damping_start": None,
    "damping_decay_epochs": 0.0,
    "stat_decay": SPNGD_DEFAULTS["stat_decay"],
    "stat_interval": SPNGD_DEFAULTS["stat_interval"],
    "inverse_interval": SPNGD_DEFAULTS["inverse_interval"],
    "statistics_examples": SPNGD_DEFAULTS["statistics_examples"],
    "a_examples": SPNGD_DEFAULTS["a_examples"],
    "a_patches": SPNGD_DEFAULTS["a_patches"],
    "fisher": SPNGD_DEFAULTS["fisher"],
    "damping_form": SPNGD_DEFAULTS["damping_form"],
    "rescale_weights": True,
    "mixup_alpha": 0.0,
    "mixup_off_epoch": None,
    "label_smoothing": 0.0,
    "eval_every_steps": 0,
    "eval_batchnorm": BATCHNORM_STATISTICS[0],
    "max_bad_steps": SPNGD_DEFAULTS["max_bad_steps"],
    "seed": 0,
    "threads": None,
    "dist_timeout": 600.0,
    "progress": True,
}
"""Values that hold unless the data's or the optimizer's defaults below set them: the regime
SP-NGD is for, a large batch (on the digits, 1,024 of the 1,497 training images per step,
58 steps in 40 epochs). SP-NGD's damping 3e-3, three times the optimizer's own default, is
the best of ``benchmarks/steps_to_accuracy.py``'s screens at this batch (docs/benchmarks.md):
0.82x the steps of 1e-3 over ten seeds."""

SGD_WEIGHT_DECAY = 5e-4
"""SGD's weight decay, which SP-NGD takes too (below)."""

OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "spngd": {
        "lr": 0.025,
        "momentum": SPNGD_DEFAULTS["momentum"],
        "warmup_epochs": 0.0,
        "weight_decay": SGD_WEIGHT_DECAY,
    },
    "sgd": {
        "lr": 0.4,
        "momentum": 0.9,
        "warmup_epochs": 2.0,
        "weight_decay": SGD_WEIGHT_DECAY,
    },
}
"""The best of ``benchmarks/steps_to_accuracy.py``'s screens on the digits at batch 1,024
(docs/benchmarks.md), in steps to 97% validation accuracy over ten seeds: SGD over learning
rates 0.1-0.8 and warm-ups of 0-2 epochs, SP-NGD over learning rates, dampings, momenta and
warm-ups. SP-NGD takes SGD's weight decay (the optimizer's own default is none), so that
both regularise alike (its screen moved the steps within the seeds' spread and raised the
final accuracy)."""

COMPARE_DEFAULTS: dict[str, Any] = {"eval_every_steps": 1}
"""What ``spngd compare`` changes from the defaults above: validation after every step, so
that the plot shows steps and time to a target."""

DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"crop": "none", "flip": False, "image_size": 8, "workers": 0},
    "synthetic": {"crop": "pad", "flip": True, "image_size": 32, "workers": 0},
    "cifar10": {"crop": "pad", "flip": True, "image_size": 32, "workers": 2},
    "imagefolder": {
        "crop": "resized",
        "flip": True,
        "image_size": 224,
        "workers": 8,
        "batch_size": 32,
    },
    "mnist1d": {
        "model": "resnet8-1d",
        "crop": "none",
        "flip": False,
        "image_size": 40,
        "workers": 0,
    },
}
"""Digits are not mirror-symmetric: no flips. Image folders decode JPEGs: more workers; at 224
pixels a batch of 1,024 would hold over 100 GB of activations, so they take the paper's
per-GPU batch of 32 (the learning rates above are for the digits at 1,024: give them, or a
``--recipe``).
mnist1d's sequences are neither cropped nor flipped (``image_size`` is their length, fixed)."""

DATA_FIXED: dict[str, tuple[str, ...]] = {"mnist1d": ("crop", "flip", "image_size")}
"""Options a data set's defaults fix: given another value, they are a UserError instead of
being ignored."""


def resolve_config(options: Mapping[str, Any]) -> TrainConfig:
    """The config for the options the user gave (absent keys take defaults, see module doc)."""
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(sorted(unknown))}")
    values = dict(DEFAULTS)
    data = absolute_data(options.get("data", DEFAULTS["data"]))
    kind = data_kind(data)
    for name in DATA_FIXED.get(kind, ()):
        if options.get(name, DATA_DEFAULTS[kind][name]) != DATA_DEFAULTS[kind][name]:
            raise UserError(
                f"{flag(name)} does not apply to --data {kind}: its examples are "
                f"{DATA_DEFAULTS[kind]['image_size']} long, neither cropped nor flipped"
            )
    values.update(DATA_DEFAULTS[kind])
    values["workers"] = min(values["workers"], CPUS)
    preset = recipe_settings(options.get("recipe"))
    optimizer = options.get("optimizer", preset.get("optimizer", DEFAULTS["optimizer"]))
    check_optimizer(optimizer)
    values.update(OPTIMIZER_DEFAULTS[optimizer])
    if optimizer != preset.get("optimizer", optimizer):
        preset = {k: v for k, v in preset.items() if k not in OPTIMIZER_DEFAULTS[optimizer]}
    values.update(preset)
    values.update(options)
    values["data"] = data
    values["optimizer"] = optimizer
    for name in NESTED:
        values[name] = nested_settings(name, values.get(name))
    values.setdefault("lr_decay_end", values["epochs"])
    if values.get("device") is None:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if values.get("out") is None:
        values["out"] = os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S"))
    return TrainConfig(**values)


NESTED: dict[str, type] = {"refresh": AdaptiveRefresh, "distributed": DistributedConfig}
"""Config fields that are the library's own settings objects: ``--refresh-alpha`` sets
``refresh.alpha``. Their defaults and checks are the objects' own; their knobs are the
fields made by :func:`spngd.settings.setting` (``DistributedConfig.process_group`` is not
one)."""


def knobs(settings: type) -> list[Field[Any]]:
    """The fields of a settings dataclass that are options (:data:`NESTED`)."""
    return [knob for knob in fields(settings) if "help" in knob.metadata]


def knobs_of(settings: Any) -> dict[str, Any]:
    """A settings object's knobs and their values, each as its option gives it (a value
    with a name, :func:`spngd.settings.setting`'s ``names``, by its name)."""
    values = {}
    for knob in knobs(type(settings)):
        value = getattr(settings, knob.name)
        names = knob.metadata.get("names", {})
        values[knob.name] = next((name for name, v in names.items() if v == value), value)
    return values


def nested_settings(name: str, given: Mapping[str, Any] | None) -> Any:
    """The settings object of nested field ``name`` (:data:`NESTED`) for the knobs given
    (those left out keep the object's defaults); a UserError naming the flag
    (``--NAME-KNOB``) of an unknown or bad one."""
    settings = NESTED[name]
    given = dict(given or {})
    by_name = {knob.name: knob for knob in knobs(settings)}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        flags = ", ".join(flag(f"{name}_{knob}") for knob in unknown)
        raise UserError(f"unknown option(s): {flags}")
    for knob, value in given.items():  # a name stands for its value; others go to the check
        if isinstance(value, str):
            given[knob] = by_name[knob].metadata.get("names", {}).get(value, value)
    try:
        return settings(**given)
    except InvalidSettingError as error:
        raise flag_error(error, f"{name}_") from None


def merged_options(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``given``, the nested settings (:data:`NESTED`) knob by knob."""
    merged = {**base, **given}
    for name in NESTED:
        if name in base and name in given:
            merged[name] = {**base[name], **given[name]}
    return merged


def absolute_data(data: str) -> str:
    """``--data`` as saved in a run: a folder as an absolute path (so that the run resumes
    from any directory, and the same folder compares equal however it was written); the
    embedded sets by name. An empty name is a UserError (it would read as the current
    directory)."""
    if not data.strip():
        raise UserError(f"--data must be a data set name or a folder, got {data!r}")
    if data in ("digits", "synthetic") or mnist1d.is_named(data):
        return data
    return os.path.abspath(os.path.expanduser(data))


def _same_setting(name: str, given: Any, saved: Any) -> bool:
    """Whether a resumed run's ``given`` value of ``name`` is the saved one: for ``--data``,
    the same folder however it is reached (through a symbolic link too)."""
    if given == saved:
        return True
    folders = name == "data" and os.path.isabs(given) and os.path.isabs(saved)
    return folders and os.path.realpath(given) == os.path.realpath(saved)


RESUME_FIXED = ("data", "model", "zero_init_residual", "optimizer", "recipe", "batch_size", "seed")
"""Options a resumed run cannot change: the saved model and optimizer state, the data order
and the meaning of the step counter depend on them."""


def check_same_run(checkpoint: Path, saved: Mapping[str, Any], recorded: Mapping[str, Any]) -> None:
    """A UserError when the options ``checkpoint`` was ``saved`` with and those its run
    folder ``recorded`` (its config.json) differ in one of :data:`RESUME_FIXED`: the
    checkpoint belongs to another run (copied in by hand, say), and resuming it would train
    that run in this folder."""
    for name in RESUME_FIXED:
        if name not in recorded or name not in saved:  # a config without it: nothing to compare
            continue
        mine, theirs = saved[name], recorded[name]
        if name == "data" and isinstance(mine, str) and isinstance(theirs, str):
            mine, theirs = absolute_data(mine), absolute_data(theirs)
        if not _same_setting(name, mine, theirs):
            raise UserError(
                f"--resume: {checkpoint} belongs to another run: its {flag(name)} is "
                f"{mine!r}, {checkpoint.parent / 'config.json'}'s {theirs!r}"
            )


def resume_config(saved: Mapping[str, Any], options: Mapping[str, Any]) -> TrainConfig:
    """The config of a resumed run: the saved run's, with the options the user gave now.

    Options not given keep their saved values (``--epochs`` alone does not move the saved
    ``--lr-decay-end``); changing one of :data:`RESUME_FIXED` is a UserError.
    """
    saved = {
        "statistics_examples": None,  # a saved config without it took every example
        "a_examples": None,  # ... and A from as many as the other statistics
        **_nest_flat_refresh(saved),
        "data": absolute_data(saved.get("data", DEFAULTS["data"])),
    }
    options = {**options, **({"data": absolute_data(options["data"])} if "data" in options else {})}
    for name in RESUME_FIXED:
        if name in options and not _same_setting(name, options[name], saved.get(name)):
            raise UserError(
                f"--resume: {flag(name)} {options[name]} differs from the saved run's "
                f"{saved.get(name)!r}; a resumed run keeps {', '.join(map(flag, RESUME_FIXED))}"
            )
    if "epochs" in options and "lr_decay_end" not in options:
        # Said when --epochs moves past the decay's end, not again at each later resume.
        decay_end = saved.get("lr_decay_end", saved.get("epochs"))
        extended = options["epochs"] > saved.get("epochs", -math.inf)
        if decay_end is not None and extended and options["epochs"] > decay_end:
            warnings.warn(
                f"--epochs {options['epochs']:g} goes past the saved --lr-decay-end "
                f"{decay_end:g}: the learning rate stays 0 after epoch {decay_end:g} (give "
                "--lr-decay-end to move it)",
                RuntimeWarning,
                stacklevel=2,
            )
    return resolve_config(merged_options(saved, options))


SAVED_RULE_NAMES = {"spec": "threshold"}
"""Refresh rules under the names older run folders saved them with."""


def _nest_flat_refresh(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config with its refresh knobs nested as ``refresh`` (config.json holds them
    nested, or as flat ``refresh_alpha``-style entries) and its rule by the name it has now."""
    flat = {key: value for key, value in saved.items() if key.startswith("refresh_")}
    rest = {key: value for key, value in saved.items() if key not in flat}
    refresh = dict(rest.get("refresh") or {})
    refresh.update((key.removeprefix("refresh_"), value) for key, value in flat.items())
    if not refresh:
        return rest
    if "rule" in refresh:
        refresh["rule"] = SAVED_RULE_NAMES.get(refresh["rule"], refresh["rule"])
    return {**rest, "refresh": refresh}
