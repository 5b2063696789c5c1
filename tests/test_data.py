"""Data sets: IDX/CIFAR/ImageFolder parsing on tiny files written here, MNIST when present, digits,
synthetic data, and TensorLoader shuffling, sharding and resume."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qat_ste.errors import QatSteError
from qat_ste.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetInfo,
    TensorImageDataset,
    TensorLoader,
    load_dataset,
    parse_dataset_spec,
    random_crop_flip,
    read_idx,
    stratified_split,
)

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------------------------
# helpers that write tiny files in the real formats
# ------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_tiny_mnist(folder: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10)[::-1].astype(np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


def write_tiny_cifar(folder: Path, per_batch: int = 6) -> tuple[np.ndarray, list[int]]:
    """cifar-10-batches-py with data_batch_1..5 and test_batch in the real pickled format."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(1)
    all_data, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        content = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(batches / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
        if name != "test_batch":
            all_data.append(data)
            all_labels += labels
    meta = {b"label_names": [n.encode() for n in "abcdefghij"], b"num_cases_per_batch": per_batch}
    with open(batches / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return np.concatenate(all_data), all_labels


def write_png_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 12)) -> None:
    from PIL import Image

    for index, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.full((size[0], size[1], 3), 40 * index + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i}.png")


# ------------------------------------------------------------------------------------------
# IDX parsing and MNIST loading on tiny files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", images, gz)
    out = read_idx(path, expected_magic=0x803)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)
    # Other element types parse too (big-endian on disk, native in memory).
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(idx_bytes(ints, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), ints)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    cases = {
        "truncated_data": (good[:-5], "truncated"),
        "truncated_header": (good[:6], "truncated"),
        "tiny": (b"\x00\x00", "truncated"),
        "trailing": (good + b"\x00\x00", "corrupt"),
        "not_idx": (b"PK\x03\x04" + good[4:], "0x504b0304"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(QatSteError, match=message) as info:
            read_idx(tmp_path / name)
        assert name in str(info.value) and "fix:" in str(info.value)
    labels = tmp_path / "labels"
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(QatSteError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(labels, expected_magic=0x803)
    truncated_gz = tmp_path / "cut.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(QatSteError, match="truncated or corrupt gzip"):
        read_idx(truncated_gz)


@pytest.mark.parametrize("gz", [False, True])
def test_load_tiny_mnist(tmp_path: Path, gz: bool) -> None:
    arrays = write_tiny_mnist(tmp_path / "mnist", gz)
    train = load_dataset(f"mnist:{tmp_path / 'mnist'}", "train")
    test = load_dataset(f"mnist:{tmp_path / 'mnist'}", "test", pad_to=32)
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.class_counts().tolist() == [2] * 10
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert test.images.shape == (10, 1, 32, 32) and test.info.image_size == (32, 32)
    assert test.images[:, :, :2].sum() == 0 and test.images[:, :, :, -2:].sum() == 0
    np.testing.assert_array_equal(test.images[:, 0, 2:30, 2:30].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert test.labels.tolist() == list(range(9, -1, -1))
    assert train.info.mean == MNIST_MEAN and train.info.std == MNIST_STD and train.info.num_classes == 10


def test_mnist_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(QatSteError, match="does not exist") as info:
        load_dataset(f"mnist:{tmp_path / 'nowhere'}")
    assert "--data mnist:FOLDER" in str(info.value)
    folder = tmp_path / "mnist"
    arrays = write_tiny_mnist(folder, gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    load_dataset(f"mnist:{folder}", "train")  # the train files are still there
    with pytest.raises(QatSteError, match="missing t10k-labels-idx1-ubyte") as info:
        load_dataset(f"mnist:{folder}", "test")
    assert "point --data mnist:FOLDER" in str(info.value)
    # More labels than images.
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8), gz=False)
    with pytest.raises(QatSteError, match="10 images but .* 11 labels"):
        load_dataset(f"mnist:{folder}", "test")
    # A label out of range.
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8), gz=False)
    with pytest.raises(QatSteError, match="label 12"):
        load_dataset(f"mnist:{folder}", "test")
    # Swapped files: labels where images belong.
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    )
    with pytest.raises(QatSteError, match="train-images-idx3-ubyte.gz has magic number 0x00000801"):
        load_dataset(f"mnist:{folder}", "train")
    write_tiny_mnist(tmp_path / "m2", gz=False)
    with pytest.raises(QatSteError, match="pad_to=20"):
        load_dataset(f"mnist:{tmp_path / 'm2'}", pad_to=20)


@pytest.fixture(scope="module")
def mnist_train() -> TensorImageDataset:
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    return load_dataset(f"mnist:{MNIST_DIR}", "train")


def test_real_mnist_train(mnist_train: TensorImageDataset) -> None:
    assert mnist_train.images.shape == (60000, 1, 28, 28)
    assert mnist_train.images.dtype == torch.uint8 and mnist_train.labels.dtype == torch.int64
    assert mnist_train.class_counts().tolist() == MNIST_TRAIN_COUNTS
    # The standard statistics match the data.
    pixels = mnist_train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)


def test_real_mnist_test_padded() -> None:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    test = load_dataset(f"mnist:{MNIST_DIR}", "test", pad_to=32)
    assert test.images.shape == (10000, 1, 32, 32)
    assert test.class_counts().tolist() == MNIST_TEST_COUNTS
    assert test.info.input_shape == (1, 32, 32)


# ------------------------------------------------------------------------------------------
# CIFAR-10 and ImageFolder
# ------------------------------------------------------------------------------------------


def test_tiny_cifar10(tmp_path: Path) -> None:
    data, labels = write_tiny_cifar(tmp_path)
    for folder in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train = load_dataset(f"cifar10:{folder}", "train")
        assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
        assert train.labels.tolist() == labels
        # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
        assert torch.equal(train.images[4, 1, 2, 3], torch.tensor(int(data[4, 1024 + 2 * 32 + 3])))
        assert train.augment  # standard recipe on for training
    test = load_dataset(f"cifar10:{tmp_path}", "test")
    assert test.images.shape == (6, 3, 32, 32) and not test.augment
    assert test.info.class_names == tuple("abcdefghij")
    assert test.info.mean == CIFAR10_MEAN and test.info.std == CIFAR10_STD
    assert load_dataset(f"cifar10:{tmp_path}", "train", augment=False).augment is False


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(QatSteError, match="neither the CIFAR-10 batch files"):
        load_dataset(f"cifar10:{tmp_path}")
    write_tiny_cifar(tmp_path)
    batches = tmp_path / "cifar-10-batches-py"
    (batches / "data_batch_3").unlink()
    with pytest.raises(QatSteError, match="lacks data_batch_3") as info:
        load_dataset(f"cifar10:{tmp_path}")
    assert "cifar-10-batches-py" in str(info.value)
    content = (batches / "test_batch").read_bytes()
    (batches / "test_batch").write_bytes(content[: len(content) // 2])
    with pytest.raises(QatSteError, match="test_batch is not a readable CIFAR-10 batch"):
        load_dataset(f"cifar10:{tmp_path}", "test")
    # A pickle that would run code is refused, not executed.
    with open(batches / "test_batch", "wb") as handle:
        pickle.dump({b"data": print}, handle, protocol=2)
    with pytest.raises(QatSteError, match="asks to load (__builtin__|builtins).print.*refusing"):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_imagefolder_flat_and_split_layouts(tmp_path: Path) -> None:
    write_png_folder(tmp_path / "flat", {"cat": 5, "dog": 5, "eel": 5})
    train = load_dataset(f"imagefolder:{tmp_path / 'flat'}", "train", size=8)
    val = load_dataset(f"imagefolder:{tmp_path / 'flat'}", "val", size=8)
    assert train.images.shape == (12, 3, 8, 8) and val.images.shape == (3, 3, 8, 8)
    assert train.class_counts().tolist() == [4, 4, 4] and val.class_counts().tolist() == [1, 1, 1]
    assert train.info.class_names == ("cat", "dog", "eel") and train.info.num_classes == 3
    assert train.images.dtype == torch.uint8 and not train.augment
    # Uniform images stay uniform through the resize; "dog" image 2 has value 40 + 2.
    dog = train.images[train.labels == 1]
    assert set(dog.flatten().tolist()) <= {40, 41, 42, 43, 44}
    grey = load_dataset(f"imagefolder:{tmp_path / 'flat'}", "train", size=(6, 7), channels=1)
    assert grey.images.shape == (12, 1, 6, 7) and grey.info.mean == (0.5,)

    write_png_folder(tmp_path / "split" / "train", {"a": 3, "b": 2})
    write_png_folder(tmp_path / "split" / "val", {"a": 1, "b": 1})
    split_train = load_dataset(f"imagefolder:{tmp_path / 'split'}", "train")
    split_test = load_dataset(f"imagefolder:{tmp_path / 'split'}", "test")  # falls back to val/
    assert split_train.images.shape == (5, 3, 32, 32) and split_test.labels.tolist() == [0, 1]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(QatSteError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QatSteError, match="no class subfolders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    write_png_folder(tmp_path / "bad", {"a": 2, "b": 2})
    (tmp_path / "bad" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(QatSteError, match="cannot read image .*broken.png"):
        load_dataset(f"imagefolder:{tmp_path / 'bad'}", val_fraction=0.0)
    (tmp_path / "bad" / "c").mkdir()
    with pytest.raises(QatSteError, match="holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'bad'}")


@pytest.mark.parametrize("limit, pil_behaviour", [(50, "error"), (100, "warning")])
def test_decompression_bomb_images_get_the_corrupt_file_error(tmp_path: Path, monkeypatch, limit: int,
                                                               pil_behaviour: str) -> None:
    """10 x 12 = 120 pixels against a lowered limit: over 2x it PIL raises DecompressionBombError,
    between 1x and 2x it only warns; both are refused alike, naming the file, pixels and limit."""
    from PIL import Image

    write_png_folder(tmp_path / "imgs", {"a": 2, "b": 2})  # 10 x 12 images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(QatSteError) as info:
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.0)
    message = str(info.value)
    assert "cannot read image" in message and "img0.png" in message
    assert f"it has 120 pixels, more than PIL's decompression-bomb limit of {limit} pixels" in message
    assert f"fix: remove the file, or resize it to at most {limit} pixels" in message


def test_other_undecodable_images_get_the_corrupt_file_error(tmp_path: Path) -> None:
    from PIL import Image

    write_png_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    pixels = (np.arange(10 * 12 * 3) % 256).astype(np.uint8).reshape(10, 12, 3)
    Image.fromarray(pixels).save(tmp_path / "ok.tif")
    damaged = bytearray((tmp_path / "ok.tif").read_bytes())
    damaged[72] ^= 1  # a TIFF tag type PIL's decoder chokes on with a TypeError (not an OSError)
    (tmp_path / "imgs" / "b" / "damaged.tif").write_bytes(bytes(damaged))
    with pytest.raises(QatSteError, match="cannot read image .*damaged.tif") as info:
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.0)
    assert "fix: replace or delete the file" in str(info.value)


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    write_png_folder(tmp_path / "flat", {"only": 4})
    with pytest.raises(QatSteError) as info:
        load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    assert str(info.value).startswith(f"1 class found in {tmp_path / 'flat'}: a classifier needs at least 2 "
                                      "class folders")
    write_png_folder(tmp_path / "split" / "train", {"only": 3})
    write_png_folder(tmp_path / "split" / "val", {"only": 1})
    with pytest.raises(QatSteError, match="1 class found in .*split.train: a classifier needs at least 2"):
        load_dataset(f"imagefolder:{tmp_path / 'split'}", "val")
    # MNIST / CIFAR-10 files whose labels are all one class
    arrays = write_tiny_mnist(tmp_path / "mnist", gz=False)
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.full(20, 3, np.uint8), gz=False)
    with pytest.raises(QatSteError, match="1 class found in .*train-labels-idx1-ubyte: a classifier needs"):
        load_dataset(f"mnist:{tmp_path / 'mnist'}", "train")
    assert load_dataset(f"mnist:{tmp_path / 'mnist'}", "test").labels.tolist() == \
        arrays["t10k-labels-idx1-ubyte"].tolist()  # the other split is untouched
    write_tiny_cifar(tmp_path / "cifar")
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    with open(batches / "test_batch", "rb") as handle:
        content = pickle.load(handle, encoding="bytes")
    content[b"labels"] = [7] * len(content[b"labels"])
    with open(batches / "test_batch", "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    with pytest.raises(QatSteError, match="1 class found in .*test_batch.*a classifier needs at least 2"):
        load_dataset(f"cifar10:{tmp_path / 'cifar'}", "test")


# ------------------------------------------------------------------------------------------
# digits, synthetic, specs
# ------------------------------------------------------------------------------------------


def test_digits_split_sizes_and_determinism() -> None:
    train = load_dataset("digits", "train")
    val = load_dataset("digits", "val")
    assert train.images.shape == (1438, 1, 8, 8) and val.images.shape == (359, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    # Stratified: every class loses round(20 %) of its images.
    total = train.class_counts() + val.class_counts()
    assert total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    expected_val = [int(np.floor(c * 0.2 + 0.5)) for c in total.tolist()]
    assert val.class_counts().tolist() == expected_val
    again = load_dataset("digits", "val")
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    other_seed = load_dataset("digits", "val", seed=1)
    assert not torch.equal(other_seed.images, val.images)
    assert load_dataset("digits", "test").images.shape[0] == 359  # test == val
    resized = load_dataset("digits", "train", resize=32)
    assert resized.images.shape == (1438, 1, 32, 32) and resized.info.image_size == (32, 32)
    assert torch.equal(resized.labels, train.labels)


def test_stratified_split_disjoint_and_complete() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(16))
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]


def test_normalisation_values() -> None:
    train = load_dataset("digits", "train")
    x = train.normalize(train.images)
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std().item() == pytest.approx(1.0, abs=1e-4)
    # A hand-made set: value 255 with mean 0.5, std 0.25 -> (1 - 0.5) / 0.25 = 2.
    info = DatasetInfo("toy", 2, 2, (1, 1), (0.5, 0.0), (0.25, 1.0))
    toy = TensorImageDataset(torch.tensor([[[[255]], [[51]]]], dtype=torch.uint8), torch.tensor([1]), info)
    image, label = toy[0]
    assert label == 1 and image.shape == (2, 1, 1)
    assert image[:, 0, 0].tolist() == pytest.approx([2.0, 0.2])
    images, labels = toy.get_batch(torch.tensor([0, 0]))
    assert images.shape == (2, 2, 1, 1) and labels.tolist() == [1, 1]


def test_synthetic_data_is_seeded_and_learnable() -> None:
    train = load_dataset("synthetic", "train", num_classes=4, size=16, channels=3, n=400, seed=5)
    val = load_dataset("synthetic", "val", num_classes=4, size=16, channels=3, n=200, seed=5)
    assert train.images.shape == (400, 3, 16, 16) and val.images.shape == (200, 3, 16, 16)
    assert train.class_counts().tolist() == [100] * 4
    assert train.info.mean == val.info.mean  # same statistics for every split
    assert torch.equal(train.images, load_dataset("synthetic", num_classes=4, size=16, n=400, seed=5).images)
    assert not torch.equal(train.images[:200], val.images)
    # Nearest class mean on normalised pixels already separates the classes.
    x_train, x_val = train.normalize(train.images).flatten(1), val.normalize(val.images).flatten(1)
    centroids = torch.stack([x_train[train.labels == c].mean(0) for c in range(4)])
    predicted = torch.cdist(x_val, centroids).argmin(1)
    assert (predicted == val.labels).float().mean().item() > 0.9
    grey = load_dataset("synthetic", channels=1, size=(20, 24), n=10)
    assert grey.images.shape == (10, 1, 20, 24)


def test_specs_and_option_errors() -> None:
    assert parse_dataset_spec("digits") == ("digits", None)
    assert parse_dataset_spec("MNIST:/a/b") == ("mnist", Path("/a/b"))
    with pytest.raises(QatSteError, match="unknown data set 'svhn'") as info:
        load_dataset("svhn:/x")
    assert "digits, synthetic, mnist:FOLDER, cifar10:FOLDER, imagefolder:FOLDER" in str(info.value)
    with pytest.raises(QatSteError, match="needs a folder"):
        load_dataset("mnist")
    with pytest.raises(QatSteError, match="takes no folder"):
        load_dataset("digits:/x")
    with pytest.raises(QatSteError, match="does not take option.*pad_to") as info:
        load_dataset("digits", pad_to=32)
    assert "resize" in str(info.value)
    with pytest.raises(QatSteError, match="unknown split 'dev'"):
        load_dataset("digits", "dev")


# ------------------------------------------------------------------------------------------
# augmentation and the loader
# ------------------------------------------------------------------------------------------


def test_random_crop_flip_is_a_shifted_or_flipped_window() -> None:
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).remainder(250).add(1).to(torch.uint8)
    images = images.reshape(2, 3, 6, 6)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [
            view
            for dy in range(5)
            for dx in range(5)
            for view in (padded[i, :, dy : dy + 6, dx : dx + 6], padded[i, :, dy : dy + 6, dx : dx + 6].flip(-1))
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    again = random_crop_flip(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    no_padding = random_crop_flip(images, 0, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(no_padding[i], images[i]) or torch.equal(no_padding[i], images[i].flip(-1))


def tiny_dataset(n: int = 50, augment: bool = False) -> TensorImageDataset:
    info = DatasetInfo("tiny", 5, 1, (4, 4), (0.0,), (1.0,))
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorImageDataset(images, torch.arange(n) % 5, info, augment=augment)


def ids(images: torch.Tensor) -> list[int]:
    """Recover the image ids from tiny_dataset batches (pixel value = id / 255)."""
    return (images[:, 0, 0, 0] * 255).round().long().tolist()


def test_loader_epoch_order_is_seeded_and_set_epoch_reshuffles() -> None:
    loader = TensorLoader(tiny_dataset(), 8, seed=3)
    assert len(loader) == 7  # 50 / 8 rounded up
    epoch0 = [i for x, _ in loader for i in ids(x)]
    assert sorted(epoch0) == list(range(50))
    assert loader.epoch == 1  # moved on by itself
    epoch1 = [i for x, _ in loader for i in ids(x)]
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(50))
    other = TensorLoader(tiny_dataset(), 8, seed=3)
    other.set_epoch(1)
    assert [i for x, _ in other for i in ids(x)] == epoch1
    dropping = TensorLoader(tiny_dataset(), 8, seed=3, drop_last=True)
    batches = list(dropping)
    assert len(dropping) == len(batches) == 6 and all(x.shape[0] == 8 for x, _ in batches)
    ordered = TensorLoader(tiny_dataset(), 16, shuffle=False)
    assert [i for x, _ in ordered for i in ids(x)] == list(range(50))


def test_two_ranks_partition_the_epoch_and_keep_the_global_order() -> None:
    dataset = tiny_dataset(48)
    single = TensorLoader(dataset, 8, seed=11)  # one process, global batch 8
    ranks = [TensorLoader(dataset, 4, seed=11, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        for loader in [single, *ranks]:
            loader.set_epoch(epoch)
        global_batches = [ids(x) for x, _ in single]
        rank_batches = [[ids(x) for x, _ in loader] for loader in ranks]
        assert len(rank_batches[0]) == len(rank_batches[1]) == 6
        seen = [i for batches in rank_batches for batch in batches for i in batch]
        assert sorted(seen) == list(range(48))  # disjoint and complete
        for k, batch in enumerate(global_batches):
            assert sorted(rank_batches[0][k] + rank_batches[1][k]) == sorted(batch)
    # Uneven: padded by repeating so both ranks take the same number of steps.
    uneven = [TensorLoader(tiny_dataset(49), 4, seed=0, rank=r, world_size=2) for r in range(2)]
    counts = [sum(x.shape[0] for x, _ in loader) for loader in uneven]
    assert counts == [25, 25] and len(uneven[0]) == len(uneven[1]) == 7
    with pytest.raises(QatSteError, match="rank 2 is not in"):
        TensorLoader(dataset, 4, rank=2, world_size=2)


def test_loader_resumes_mid_epoch_exactly_with_augmentation() -> None:
    dataset = tiny_dataset(40, augment=True)
    reference = TensorLoader(dataset, 6, seed=7)
    reference.set_epoch(2)
    expected = [(x.clone(), y.clone()) for x, y in reference]

    first = TensorLoader(dataset, 6, seed=7)
    first.set_epoch(2)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batch_index"] == 3

    resumed = TensorLoader(dataset, 6, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop re-announcing the epoch does not rewind
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (x, y), (x_ref, y_ref) in zip(rest, expected[3:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["batch_index"] == 0
    # A break and a new loop continue where the old one stopped.
    first_rest = list(first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first_rest, expected[3:], strict=True))
    with pytest.raises(QatSteError, match="batch_size=6, this loader has batch_size=5"):
        TensorLoader(dataset, 5, seed=7).load_state_dict(state)


def test_standard_dataloader_works() -> None:
    train = load_dataset("digits", "train")
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == train.labels[:32].tolist()
    fast_images, _ = train.get_batch(torch.arange(32))
    assert torch.allclose(images, fast_images)
    assert torch.equal(train[-1][0], train.normalize(train.images[-1]))
    with pytest.raises(IndexError):
        train[len(train)]
