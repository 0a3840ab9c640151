"""MNIST from its idx files: both layouts, gzipped or not, checksums, the official split."""

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from genpipe.cli import main
from genpipe.config import parse_params
from genpipe.data.catalog import SOURCES
from genpipe.data.mnist import MNIST_MD5, mnist
from genpipe.data.raw import DataError, read_raw, write_raw
from genpipe.data.sources import load_source, loader
from genpipe.data.splits import split_indices
from genpipe.stages import prepare

REPO = Path(__file__).resolve().parents[1]
REAL_MNIST = REPO.parent / "shared" / "datasets" / "mnist"
N_TRAIN, N_TEST = 40, 20  # 4 and 2 per class


def write_mnist(folder: Path, gz: bool, seed: int = 0) -> tuple[dict[str, str], dict]:
    """Four small idx files; returns their md5 table (of the plain bytes) and the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        arrays[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    checksums = {}
    for name, arr in arrays.items():
        head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        blob = head + arr.tobytes()
        checksums[name] = hashlib.md5(blob).hexdigest()
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
        else:
            (folder / name).write_bytes(blob)
    return checksums, arrays


@pytest.mark.parametrize("layout", ["torchvision", "plain"])
@pytest.mark.parametrize("gz", [True, False])
def test_reads_both_layouts_gzipped_or_not(tmp_path, layout, gz):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    checksums, arrays = write_mnist(folder, gz)
    data = mnist(tmp_path, checksums)
    assert len(data.images) == N_TRAIN + N_TEST and data.images[0].shape == (28, 28, 1)
    assert np.array_equal(data.images[0][..., 0], arrays["train-images-idx3-ubyte"][0])
    assert np.array_equal(data.images[N_TRAIN][..., 0], arrays["t10k-images-idx3-ubyte"][0])
    expected = np.concatenate([arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]])
    assert data.labels.tolist() == expected.tolist()
    assert data.test_indices == list(range(N_TRAIN, N_TRAIN + N_TEST))
    assert data.classes == [str(c) for c in range(10)]
    assert data.origins[0] == "train:0" and data.origins[N_TRAIN] == "test:0"


def test_export_is_byte_deterministic_and_keeps_the_split(tmp_path):
    checksums, _ = write_mnist(tmp_path / "src", gz=True)
    write_raw(mnist(tmp_path / "src", checksums), tmp_path / "a")
    write_raw(mnist(tmp_path / "src", checksums), tmp_path / "b")
    for name in ("pixels.npy", "shapes.npy", "labels.npy", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert read_raw(tmp_path / "a").test_indices == list(range(N_TRAIN, N_TRAIN + N_TEST))


def test_missing_file_is_named(tmp_path):
    checksums, _ = write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte .*missing"):
        mnist(tmp_path, checksums)


def test_no_files_names_both_places(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw or .* pass --path"):
        mnist(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_wrong_checksum_is_named(tmp_path, gz):
    checksums, _ = write_mnist(tmp_path, gz)
    checksums["train-images-idx3-ubyte"] = "0" * 32
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte(\.gz)? has md5 .*0{32}"):
        mnist(tmp_path, checksums)


def test_the_official_checksums_refuse_other_files(tmp_path, capsys):
    write_mnist(tmp_path / "src", gz=True)
    out = tmp_path / "raw"
    assert main(["data", "fetch", "mnist", "--path", str(tmp_path / "src"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "train-images-idx3-ubyte.gz has md5" in err and MNIST_MD5["train-images-idx3-ubyte"] in err
    )
    assert not out.exists()


def test_broken_gzip_and_header_are_named(tmp_path):
    checksums, _ = write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is not a readable gzip"):
        mnist(tmp_path, checksums)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x0d\x03" + bytes(12)))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz is not an idx file"):
        mnist(tmp_path, {})  # no checksums: the header check is what stops it


def test_official_split_keeps_test_and_draws_val_per_class_from_train():
    labels = np.repeat(np.arange(3), 30)  # 20 train + 10 test per class
    test = [i for i in range(90) if i % 30 >= 20]
    split = split_indices(labels, test, train_frac=0.5, val_frac=0.25, seed=1)
    assert split["test"].tolist() == test
    assert set(split["train"]) | set(split["val"]) == set(range(90)) - set(test)
    assert not set(split["train"]) & set(split["val"])
    assert np.bincount(labels[split["val"]]).tolist() == [5, 5, 5]  # 0.25 of 20, train_frac unused


def test_prepare_uses_the_official_test_set(tmp_path, monkeypatch, mlflow_uri):
    checksums, arrays = write_mnist(tmp_path / "src", gz=False)
    write_raw(mnist(tmp_path / "src", checksums), tmp_path / "data/raw")
    monkeypatch.chdir(tmp_path)
    card = prepare.run(parse_params({"prepare": {"image_size": 28}}), tmp_path)
    assert card["splits"]["test"]["count"] == N_TEST
    assert card["splits"]["val"]["per_class"] == {str(c): 1 for c in range(10)}  # 0.15 of 4
    assert card["splits"]["train"]["count"] == N_TRAIN - 10
    x = np.load(tmp_path / "data/prepared/test/images.npy")
    assert np.allclose(x[:, 0] * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3)


def test_params_and_cli_take_source_names_from_the_one_list():
    from typing import get_args

    from genpipe.cli import build_parser
    from genpipe.config import Base

    assert get_args(Base.model_fields["source"].annotation) == tuple(SOURCES)
    data_cmd = next(a for a in build_parser()._actions if a.dest == "command").choices["data"]
    fetch = next(a for a in data_cmd._actions if a.dest == "data_cmd").choices["fetch"]
    assert next(a for a in fetch._actions if a.dest == "source").choices == list(SOURCES)
    assert all(callable(loader(name)) for name in SOURCES)  # each entry names a real loader


@pytest.mark.skipif(
    not REAL_MNIST.is_dir(), reason=f"the real MNIST files are not at {REAL_MNIST} (optional)"
)
def test_real_mnist_counts_and_classes():
    data = load_source("mnist", REAL_MNIST)
    assert len(data.images) == 70_000 and data.images[0].shape == (28, 28, 1)
    assert data.test_indices == list(range(60_000, 70_000))
    train_counts = np.bincount(data.labels[:60_000]).tolist()
    assert train_counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data.labels[60_000:]).sum() == 10_000


@pytest.mark.parametrize(("train", "test"), [(1, 1), (2, 0)])
def test_official_split_needs_two_train_and_one_test_image_per_class(train, test):
    from genpipe.data.classes import check_classes

    labels = np.array([0] * 5 + [1] * train + [0] * 2 + [1] * test)
    test_indices = list(range(5 + train, len(labels)))
    with pytest.raises(DataError, match=rf"here: class '1' has {train} image.*and {test} in it"):
        check_classes(labels, ["0", "1"], test_indices, "here")
    check_classes(np.array([0] * 5 + [1] * 2 + [0, 1]), ["0", "1"], [7, 8], "here")  # enough


def test_per_class_subset_keeps_the_first_of_each_class_in_each_split(
    tmp_path, monkeypatch, capsys
):
    checksums, arrays = write_mnist(tmp_path / "src", gz=True)
    monkeypatch.setattr(mnist, "__defaults__", (None, checksums))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "fetch", "mnist", "--path", "src", "--per-class", "1"]) == 0
    sub = read_raw(tmp_path / "data/raw")
    train_y = arrays["train-labels-idx1-ubyte"].tolist()
    firsts = sorted(train_y.index(c) for c in range(10))
    assert sub.origins[:10] == [f"train:{i}" for i in firsts]
    assert sub.test_indices == list(range(10, 20))
    assert sorted(sub.labels[:10].tolist()) == sorted(sub.labels[10:].tolist()) == list(range(10))
    assert np.array_equal(sub.images[0][..., 0], arrays["train-images-idx3-ubyte"][firsts[0]])
    assert main(["data", "fetch", "mnist", "--path", "src", "--per-class", "0"]) == 2
    assert "--per-class must be >= 1" in capsys.readouterr().err
