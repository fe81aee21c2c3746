"""Data sets: embedded digits, synthetic, CIFAR-10 batches, image folders; loaders."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from spngd.train.augment import pad_crop, random_flip
from spngd.train.config import TrainConfig, resolve_config
from spngd.train.data import (
    TensorImages,
    TensorSequences,
    data_kind,
    load_data,
    make_loaders,
)
from spngd.train.errors import UserError
from tests.train.conftest import write_image_folder


def _config(data: str, **options: object) -> TrainConfig:
    return resolve_config({"data": data, "device": "cpu", "batch_size": 4, **options})


def test_digits_are_embedded_and_split_1497_300() -> None:
    data = load_data(_config("digits"))
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (
        1497,
        300,
        10,
        1,
    )
    image, label = data.train[0]
    assert image.shape == (1, 8, 8) and 0 <= label < 10
    pixels = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert abs(pixels.mean()) < 1e-3 and pixels.std() == pytest.approx(1.0, abs=1e-3)
    again = load_data(_config("digits", seed=5))
    assert torch.equal(data.val.labels, again.val.labels)  # the split does not follow --seed
    counts = torch.bincount(data.val.labels, minlength=10)
    assert counts.min() >= 20  # every digit is validated


def test_synthetic_data_for_timing() -> None:
    data = load_data(_config("synthetic", image_size=16))
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (
        1024,
        256,
        10,
        3,
    )
    assert data.train[0][0].shape == (3, 16, 16)


def _write_cifar(folder: Path, per_batch: int = 6) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(index + k) % 10 for k in range(per_batch)],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return folder


def test_cifar10_batches_are_detected_and_loaded(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    assert data_kind(str(folder)) == "cifar10"
    config = _config(str(folder))
    assert (config.crop, config.flip, config.image_size) == ("pad", True, 32)
    data = load_data(config)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (30, 6, 10, 3)
    with open(folder / "data_batch_1", "rb") as file:
        raw = pickle.load(file, encoding="bytes")[b"data"][0].reshape(3, 32, 32)
    eval_image = data.val.images[0]
    assert eval_image.shape == (3, 32, 32) and data.train.images[0].tolist() == raw.tolist()
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="lacks data_batch_3"):
        data_kind(str(folder))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda batch: {**batch, b"labels": batch[b"labels"][:-1]}, "holds 6 images but 5 labels"),
        (
            lambda batch: {**batch, b"labels": [15, *batch[b"labels"][1:]]},
            "holds label 15; CIFAR-10",
        ),
        (
            lambda batch: {**batch, b"labels": [-1, *batch[b"labels"][1:]]},
            "holds label -1; CIFAR-10",
        ),
        (lambda batch: [batch[b"data"], batch[b"labels"]], "not a CIFAR-10 batch (a pickled list"),
        (lambda batch: {**batch, b"data": batch[b"data"][:, :100]}, "malformed CIFAR-10 batch"),
        (lambda batch: {**batch, b"data": batch[b"data"] * 1000.0}, "pixels are float64"),
        (lambda batch: {**batch, b"labels": [2**70] * 6}, "malformed CIFAR-10 batch"),
        (lambda batch: {b"data": batch[b"data"][:0], b"labels": []}, "holds no images"),
        (
            lambda batch: {**batch, b"data": batch[b"data"].reshape(-1, 32, 32, 3)},
            "malformed CIFAR-10 batch (images of shape 6x32x32x3, not N x 3072",
        ),
    ],
    ids=[
        "fewer-labels",
        "label-15",
        "label-minus-1",
        "a-list",
        "short-images",
        "float-pixels",
        "huge-labels",
        "empty",
        "channels-last",
    ],
)
def test_a_malformed_cifar_batch_is_a_one_line_error(
    tmp_path: Path, damage: Callable[[dict], object], message: str
) -> None:
    """Real pickles, damaged the ways people's copies are: nothing is read silently wrong."""
    folder = _write_cifar(tmp_path / "cifar-10-batches-py")
    with open(folder / "data_batch_2", "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    with open(folder / "data_batch_2", "wb") as file:
        pickle.dump(damage(batch), file)
    with pytest.raises(UserError, match=re.escape(message)):
        load_data(_config(str(folder)))
    with open(folder / "data_batch_2", "wb") as file:
        pickle.dump(batch, file)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="cannot read CIFAR-10 batch"):
        load_data(_config(str(folder)))


def test_image_folder_is_decoded_to_normalized_tensors(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", classes=3, per_class=2, size=20)
    config = _config(str(root), image_size=16)
    assert (config.crop, config.flip) == ("resized", True)
    data = load_data(config)
    assert (len(data.train), len(data.val), data.num_classes, data.in_channels) == (6, 6, 3, 3)
    image, label = data.train[5]
    assert image.shape == (3, 16, 16) and label == 2
    assert data.val[0][0].shape == (3, 16, 16)
    assert -2.5 < float(data.val[0][0].min()) and float(data.val[0][0].max()) < 2.7


def test_loaders_give_micro_batches_and_full_batches_only() -> None:
    config = _config("digits", batch_size=64, accumulate=4)
    train, val = make_loaders(load_data(config), config)
    images, labels = next(iter(train))
    assert images.shape == (16, 1, 8, 8) and labels.shape == (16,)
    assert len(train) == 1497 // 16 and sum(len(y) for _, y in val) == 300
    first = next(iter(make_loaders(load_data(config), config)[0]))[1]
    assert torch.equal(first, labels)  # the order follows the seed


def test_a_batch_is_fetched_at_once_with_each_item_as_it_would_be_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 6, 6), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,), generator=generator)
    mean, std = torch.tensor([100.0, 120.0, 140.0]), torch.tensor([50.0, 60.0, 70.0])

    def transform(image: torch.Tensor) -> torch.Tensor:
        return random_flip(pad_crop(image, 2))

    data = TensorImages(images, labels, 1 / 255, mean, std, transform)
    indices = [7, 3, 39, 0, 3, 21]
    torch.manual_seed(1)
    batch = data.__getitems__(indices)
    torch.manual_seed(1)
    alone = [
        (
            transform((images[i].float() * (1 / 255) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)),
            int(labels[i]),
        )
        for i in indices
    ]
    assert [label for _, label in batch] == [label for _, label in alone]
    for (image, _), (expected, _) in zip(batch, alone, strict=True):
        assert torch.equal(image, expected)
    torch.manual_seed(1)
    assert torch.equal(data[7][0], alone[0][0])

    sequences = TensorSequences(torch.randn(40, 1, 12, generator=generator), labels)
    fetched = sequences.__getitems__(indices)
    assert [label for _, label in fetched] == [int(labels[i]) for i in indices]
    assert all(
        torch.equal(x, sequences.sequences[i]) for (x, _), i in zip(fetched, indices, strict=True)
    )


def test_a_batch_larger_than_the_training_set_is_a_user_error() -> None:
    config = _config("synthetic", batch_size=2048)
    with pytest.raises(UserError, match="1024 examples, fewer than one batch of 2048"):
        make_loaders(load_data(config), config)


def test_16_bit_grayscale_images_keep_their_shades(tmp_path: Path) -> None:
    """A 16-bit PNG opens in mode ``I;16``; converted to RGB as it is, every value above 255
    clips and a smooth gradient becomes black and white."""
    from PIL import Image

    from spngd.train.data import rgb_pixels

    gradient = np.linspace(0, 65535, 144).reshape(12, 12).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        pixels = rgb_pixels(image)
    assert pixels.shape == (12, 12, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[:, :, 1], (gradient >> 8).astype(np.uint8))
    assert len(np.unique(pixels)) == 144


def test_every_image_format_pillow_reads_counts_and_other_files_are_named(
    tmp_path: Path,
) -> None:
    """BMP, GIF, PPM, PGM, TIFF and WebP files are images of their class, as in torchvision's
    ImageFolder (plus GIF); other files are left out with one warning per split saying how
    many and of which kinds (hidden files, like ``.DS_Store``, quietly)."""
    from PIL import Image

    root = write_image_folder(tmp_path / "images", classes=2, per_class=1)
    pixels = np.random.default_rng(2).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for name in ("a.bmp", "b.GIF", "c.ppm", "e.tif", "f.tiff", "g.webp"):
        image.save(root / "train" / "c0" / name)
    image.convert("L").save(root / "train" / "c1" / "d.pgm")
    for name in ("notes.txt", "labels.txt", "README", ".DS_Store"):
        (root / "train" / "c1" / name).write_text("not an image")
    with pytest.warns(RuntimeWarning) as caught:
        data = load_data(_config(str(root), image_size=8))
    assert [str(w.message) for w in caught] == [
        f"{root / 'train'}: left out 3 file(s) that are not images (.jpg, .jpeg, .png, .bmp, "
        ".gif, .ppm, .pgm, .tif, .tiff, .webp): 2 .txt, 1 README"
    ]
    assert len(data.train) == 2 + 7
    labels = [data.train[i][1] for i in range(len(data.train))]
    assert labels.count(0) == 7 and labels.count(1) == 2
    assert all(data.train[i][0].shape == (3, 8, 8) for i in range(len(data.train)))


def test_a_link_to_a_folder_above_or_into_another_class_is_refused(tmp_path: Path) -> None:
    """Followed, a link from ``train/cat`` to ``train`` would make every dog a cat too, and
    one into ``train/dog`` would give those dogs a second label."""
    root = write_image_folder(tmp_path / "images", classes=2, per_class=2)
    link = root / "train" / "c0" / "up"
    link.symlink_to(root / "train")
    with pytest.raises(UserError, match=re.escape(f"{link} links to {root / 'train'}, a folder")):
        load_data(_config(str(root)))
    link.unlink()
    link.symlink_to(root / "train" / "c1" / "more")
    (root / "train" / "c1" / "more").mkdir()
    with pytest.raises(UserError, match=re.escape(f"{link} links into {root / 'train' / 'c1'}")):
        load_data(_config(str(root)))
    link.unlink()
    link.symlink_to(root / "val" / "c1")
    with pytest.raises(UserError, match=re.escape(f"{link} links into {root / 'val'}, whose")):
        load_data(_config(str(root)))
    link.unlink()
    link.symlink_to(tmp_path / "elsewhere")  # images kept outside the tree are the class's
    write_image_folder(tmp_path / "elsewhere", classes=1, per_class=1)  # two images below
    assert len(load_data(_config(str(root))).train) == 4 + 2


def test_an_image_folder_of_one_class_is_refused(tmp_path: Path) -> None:
    """One class: the loss is 0 from the first step and nothing is learnt."""
    root = write_image_folder(tmp_path / "images", classes=1, per_class=2)
    with pytest.raises(UserError, match=r"train has one class folder \(c0\); a classifier needs"):
        load_data(_config(str(root)))
