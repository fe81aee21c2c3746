"""Data sets and loaders: the embedded digits, mnist1d, synthetic images, CIFAR-10 batches,
image folders.

``--data`` is ``digits`` (the 8x8 handwritten digits shipped in the package, no network),
``mnist1d`` or ``mnist1d:N`` (1-D sequences generated offline, :mod:`spngd.train.mnist1d`),
``synthetic`` (random images, for timing), a CIFAR-10 python batches directory (found by its
``data_batch_1..5`` and ``test_batch`` files), or an ImageFolder tree ``train/CLASS/*.jpg``
plus ``val/CLASS/...`` (the image formats of :data:`IMAGE_EXTENSIONS`), decoded with Pillow
inside the DataLoader workers.

Every image data set yields normalized float ``(C, H, W)`` images and integer labels; the
per-image augmentation runs after normalization, so zero padding fills with the mean.
A file that Pillow cannot decode stops training with a :class:`UserError` naming it.
mnist1d yields ``(1, 40)`` sequences as generated (already standardized), unaugmented.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spngd.messages import first_sentence
from spngd.train import mnist1d
from spngd.train.augment import (
    Transform,
    pad_crop,
    random_flip,
    random_resized_crop,
    resize,
    resize_center_crop,
)
from spngd.train.errors import UserError

if TYPE_CHECKING:
    from spngd.train.config import TrainConfig

DATA_KINDS = ("digits", "mnist1d", "synthetic", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
"""Files an image folder's classes hold (any case): torchvision's ImageFolder formats and GIF
(its first frame), all of which Pillow decodes. Other files are left out with a warning."""
IMAGES = f"images ({', '.join(IMAGE_EXTENSIONS)})"
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_CLASSES = 10
DIGITS_VAL_SIZE = 300
"""The digits split: 1,497 training and 300 validation images, fixed for every run."""
SYNTHETIC_SIZES = (1024, 256)
"""Training and validation examples of ``--data synthetic`` (3 x 32 x 32, 10 classes)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def data_kind(spec: str) -> str:
    """Which of :data:`DATA_KINDS` ``--data`` names; raises UserError for an unusable folder."""
    if spec in ("digits", "synthetic"):
        return spec
    if mnist1d.size_of(spec) is not None:
        return "mnist1d"
    path = Path(spec)
    if not path.exists():
        raise UserError(f"data folder {spec} does not exist")
    if not path.is_dir():
        raise UserError(
            f"--data {spec} is not a folder (nor 'digits', 'mnist1d[:SIZE]' or 'synthetic')"
        )
    present = [name for name in CIFAR_FILES if (path / name).is_file()]
    if present:
        missing = [name for name in CIFAR_FILES if name not in present]
        if missing:
            raise UserError(f"CIFAR-10 folder {spec} lacks {', '.join(missing)}")
        return "cifar10"
    if not (path / "train").is_dir():
        raise UserError(
            f"data folder {spec} has no train/ folder (expected train/CLASS/*.jpg and "
            "val/CLASS/..., or CIFAR-10's data_batch_1..5 and test_batch)"
        )
    return "imagefolder"


@dataclass(frozen=True)
class DataBundle:
    """Training and validation sets with what the model needs to know about them."""

    train: Dataset
    val: Dataset
    train_as_val: Dataset
    """The training examples under the validation transform (no augmentation): validation's
    BatchNorm statistics are computed on them (:mod:`spngd.train.evaluation`)."""
    num_classes: int
    in_channels: int
    spatial_dims: int = 2
    """2 for images ``(C, H, W)``, 1 for sequences ``(C, L)``."""


class TensorImages(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)``, normalized per channel on access."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        scale: float,
        mean: torch.Tensor,
        std: torch.Tensor,
        transform: Transform,
    ) -> None:
        self.images, self.labels = images, labels
        self.scale, self.mean, self.std = scale, mean.view(-1, 1, 1), std.view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The items at ``indices``, normalized as one tensor (a DataLoader fetches a batch
        through this): per item only the transform remains, each drawing from the RNG in
        the order ``__getitem__`` would."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = (self.images[index].float() * self.scale - self.mean) / self.std
        labels = self.labels[index].tolist()
        return [(self.transform(image), label) for image, label in zip(images, labels, strict=True)]


class TensorSequences(Dataset):
    """Sequences held in memory as float ``(N, C, L)``, returned as they are."""

    def __init__(self, sequences: torch.Tensor, labels: torch.Tensor) -> None:
        self.sequences, self.labels = sequences, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The items at ``indices``, indexed as one tensor (a DataLoader fetches a batch
        through this)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.sequences[index], self.labels[index].tolist(), strict=True))


class ImageFiles(Dataset):
    """``(path, label)`` pairs decoded with Pillow to RGB when an item is read."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Transform) -> None:
        self.samples = samples
        self.mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                pixels = rgb_pixels(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            reason = str(error).replace(str(path), "").strip(" :'\"") or type(error).__name__
            raise UserError(
                f"cannot decode image {path} ({reason}); remove or replace it"
            ) from None
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        return self.transform((image - self.mean) / self.std), label


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels of ``image``. Integer grayscale of more than 8 bits (16-bit
    PNGs open in modes ``I;16`` and ``I``) is scaled to 8 bits, where ``convert("RGB")``
    would clip every value above 255 and leave a black and white image."""
    if image.mode.startswith("I"):
        gray = np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.array(image.convert("RGB"))


def _compose(*steps: Transform) -> Transform:
    def apply(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    return apply


def make_transforms(config: TrainConfig, kind: str) -> tuple[Transform, Transform]:
    """Per-image training and evaluation transforms for ``config.crop``, ``flip`` and size.

    Image folders hold images of any size: their evaluation view (short side to size/0.875,
    centre crop) also serves as the base of ``crop=none`` and ``crop=pad``.
    """
    size = config.image_size
    if kind == "imagefolder":
        base: Transform = partial(resize_center_crop, size=size)
    else:
        base = partial(_resize_square, size=size)
    crops: dict[str, Transform] = {
        "none": base,
        "pad": _compose(base, partial(pad_crop, padding=max(1, size // 8))),
        "resized": partial(random_resized_crop, size=size),
    }
    train = _compose(crops[config.crop], random_flip) if config.flip else crops[config.crop]
    return train, base


def _resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    return resize(image, size, size)


def load_data(config: TrainConfig) -> DataBundle:
    """Build the training and validation sets ``config.data`` names."""
    kind = data_kind(config.data)
    if kind == "mnist1d":
        (train_x, train_y), (val_x, val_y) = mnist1d.load(mnist1d.size_of(config.data))  # type: ignore[arg-type]
        train = TensorSequences(train_x, train_y)
        return DataBundle(
            train=train,
            val=TensorSequences(val_x, val_y),
            train_as_val=train,
            num_classes=mnist1d.CLASSES,
            in_channels=1,
            spatial_dims=1,
        )
    train_tf, eval_tf = make_transforms(config, kind)
    if kind == "imagefolder":
        return _image_folder(Path(config.data), train_tf, eval_tf)
    loaders = {"digits": _digits, "synthetic": _synthetic, "cifar10": _cifar10}
    (train_x, train_y), (val_x, val_y), scale = loaders[kind](config.data)
    pixels = train_x.float().mul_(scale).transpose(0, 1).flatten(1)
    mean, std = pixels.mean(dim=1), pixels.std(dim=1).clamp(min=1e-6)
    num_classes = int(torch.cat([train_y, val_y]).max()) + 1
    return DataBundle(
        train=TensorImages(train_x, train_y, scale, mean, std, train_tf),
        val=TensorImages(val_x, val_y, scale, mean, std, eval_tf),
        train_as_val=TensorImages(train_x, train_y, scale, mean, std, eval_tf),
        num_classes=num_classes,
        in_channels=train_x.shape[1],
    )


Split = tuple[torch.Tensor, torch.Tensor]


def _digits(_: str) -> tuple[Split, Split, float]:
    """The package's 1,797 digits (pixel values 0..16), split 1,497 / 300 by a fixed permutation."""
    with resources.as_file(resources.files("spngd.train") / "embedded" / "digits.npz") as path:
        archive = np.load(path)
        images = torch.from_numpy(archive["images"]).unsqueeze(1)
        labels = torch.from_numpy(archive["labels"]).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[DIGITS_VAL_SIZE:], order[:DIGITS_VAL_SIZE]
    return (images[train], labels[train]), (images[val], labels[val]), 1.0 / 16.0


def _synthetic(_: str) -> tuple[Split, Split, float]:
    """Random uint8 images with random labels (nothing to learn: for timing only)."""
    generator = torch.Generator().manual_seed(0)
    splits = []
    for count in SYNTHETIC_SIZES:
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        splits.append((images, torch.randint(0, 10, (count,), generator=generator)))
    return splits[0], splits[1], 1.0 / 255.0


def _cifar10(folder: str) -> tuple[Split, Split, float]:
    """CIFAR-10's python pickles: five training batches and ``test_batch`` as validation."""

    def read(name: str) -> Split:
        path = Path(folder) / name
        try:
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="bytes")
        except Exception as error:  # unpickling a damaged file can raise anything
            raise UserError(
                f"cannot read CIFAR-10 batch {path} ({first_sentence(error)})"
            ) from None
        if not (isinstance(batch, dict) and b"data" in batch and b"labels" in batch):
            raise UserError(
                f"{path} is not a CIFAR-10 batch (a pickled {type(batch).__name__}; expected a "
                "dict with data and labels)"
            )
        try:
            raw_data, raw_labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
            if raw_data.size == 0:
                raise UserError(f"{path} holds no images")
            if raw_data.dtype != np.uint8:
                raise ValueError(f"pixels are {raw_data.dtype}, not uint8")
            if not np.issubdtype(raw_labels.dtype, np.integer):
                raise ValueError(f"labels are {raw_labels.dtype}, not integers")
            if raw_data.shape[1:] not in ((3 * 32 * 32,), (3, 32, 32)):
                shape = "x".join(map(str, raw_data.shape))
                raise ValueError(f"images of shape {shape}, not N x 3072 (channels first)")
            data = raw_data.reshape(-1, 3, 32, 32)
            labels = raw_labels.astype(np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError) as error:
            raise UserError(f"{path}: malformed CIFAR-10 batch ({first_sentence(error)})") from None
        if len(labels) != len(data):
            raise UserError(f"{path} holds {len(data)} images but {len(labels)} labels")
        outside = labels[(labels < 0) | (labels >= CIFAR_CLASSES)]
        if outside.size:
            raise UserError(
                f"{path} holds label {int(outside[0])}; CIFAR-10 labels are 0..{CIFAR_CLASSES - 1}"
            )
        return torch.from_numpy(data), torch.from_numpy(labels)

    parts = [read(name) for name in CIFAR_FILES[:-1]]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, read(CIFAR_FILES[-1]), 1.0 / 255.0


def _image_folder(root: Path, train_tf: Transform, eval_tf: Transform) -> DataBundle:
    """``train/CLASS/**`` and ``val/CLASS/**`` (images in a class folder's subfolders count
    too); classes are the sorted training subfolders, each holding at least one image. A
    folder that cannot be read is a UserError, not a silently smaller data set."""
    try:
        return _scan_image_folder(root, train_tf, eval_tf)
    except OSError as error:
        where = error.filename or root
        raise UserError(f"cannot read {where} ({error.strerror or error})") from None


def _scan_image_folder(root: Path, train_tf: Transform, eval_tf: Transform) -> DataBundle:
    classes = sorted(entry.name for entry in os.scandir(root / "train") if entry.is_dir())
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders (expected train/CLASS/*.jpg)")
    if not (root / "val").is_dir():
        raise UserError(f"data folder {root} has no val/ folder (expected val/CLASS/*.jpg)")
    index = {name: i for i, name in enumerate(classes)}
    splits = []
    for split in ("train", "val"):
        folders = sorted(entry.name for entry in os.scandir(root / split) if entry.is_dir())
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise UserError(f"{root / split} has classes not in train/: {', '.join(unknown[:5])}")
        samples = []
        others: Counter[str] = Counter()
        other_split = root / ("val" if split == "train" else "train")
        class_folders = [root / split / name for name in folders] + [other_split]
        for name in folders:
            found = _images_under(root / split / name, class_folders, others)
            if split == "train" and not found:
                raise UserError(
                    f"class folder {root / split / name} holds no {IMAGES}; "
                    "remove it (an empty class would be one no example teaches)"
                )
            samples.extend((path, index[name]) for path in found)
        if not samples:
            raise UserError(f"{root / split} holds no {IMAGES}")
        if others:
            suffixes = ", ".join(f"{n} {suffix}" for suffix, n in others.most_common(5))
            warnings.warn(
                f"{root / split}: left out {others.total()} file(s) that are not {IMAGES}: "
                f"{suffixes}",
                RuntimeWarning,
                stacklevel=2,
            )
        splits.append(samples)
    if len(classes) == 1:
        raise UserError(
            f"{root / 'train'} has one class folder ({classes[0]}); a classifier needs two or more"
        )
    return DataBundle(
        train=ImageFiles(splits[0], train_tf),
        val=ImageFiles(splits[1], eval_tf),
        train_as_val=ImageFiles(splits[0], eval_tf),
        num_classes=len(classes),
        in_channels=3,
    )


def _images_under(folder: Path, elsewhere: Sequence[Path], others: Counter[str]) -> list[Path]:
    """Image files in ``folder`` and its subfolders (links followed, each folder once, so a
    link loop ends), sorted by path; counts the other files (hidden ones aside) by suffix in
    ``others``. A link to a folder that holds ``folder`` (whose walk would take in the other
    classes' images) or into one of ``elsewhere`` (the split's other classes, whose images
    would then have two labels, and the other split, whose images would be both trained
    and validated on) is a UserError."""
    found: list[Path] = []
    seen, real_folder = set(), os.path.realpath(folder)
    real_elsewhere = {os.path.realpath(e): e for e in elsewhere if e != folder}
    for directory, subfolders, names in os.walk(folder, onerror=_raise, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        if not _inside(real, real_folder):  # reached through a link: where does it lead?
            if _inside(real_folder, real):
                raise UserError(
                    f"{directory} links to {real}, a folder that holds the class folder "
                    f"{folder} itself (and the other classes'); remove the link"
                )
            into = [e for r, e in real_elsewhere.items() if _inside(real, r)]
            if into:
                raise UserError(
                    f"{directory} links into {into[0]}, whose images belong to another class "
                    "or split (labelled twice, or both trained and validated on); remove the "
                    "link"
                )
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(directory) / name)
            elif not name.startswith("."):
                others[os.path.splitext(name)[1].lower() or name] += 1
    return sorted(found)


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(os.path.join(folder, ""))


def _raise(error: OSError) -> None:
    raise error


def make_loaders(
    data: DataBundle, config: TrainConfig, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, DataLoader]:
    """Shuffled training micro-batches (``batch_size / (accumulate * world_size)`` per rank,
    full ones only) and validation batches in order.

    The training order comes from a generator seeded with ``config.seed``; in a
    distributed run each rank reads its own share through a ``DistributedSampler``
    (call its ``set_epoch`` every pass).
    """
    if config.batch_size % (config.accumulate * world_size):
        raise UserError(
            f"--batch-size {config.batch_size} is not divisible by --accumulate "
            f"{config.accumulate} x {world_size} ranks"
        )
    micro_batch = config.batch_size // (config.accumulate * world_size)
    if len(data.train) < config.batch_size:
        raise UserError(
            f"the training set has {len(data.train)} examples, fewer than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    common = {
        "batch_size": micro_batch,
        "num_workers": config.workers,
        "persistent_workers": config.workers > 0,
        "pin_memory": config.device.startswith("cuda"),
    }
    if world_size > 1:
        sampler = DistributedSampler(
            data.train, world_size, rank, shuffle=True, seed=config.seed, drop_last=True
        )
        train = DataLoader(data.train, sampler=sampler, drop_last=True, **common)
    else:
        generator = torch.Generator().manual_seed(config.seed)
        train = DataLoader(data.train, shuffle=True, drop_last=True, generator=generator, **common)
    # Its own generator: an iterator draws a seed from its loader's, which without one is the
    # global generator that the training augmentation reads, so validating would move it.
    val = DataLoader(data.val, shuffle=False, generator=torch.Generator(), **common)
    return train, val
