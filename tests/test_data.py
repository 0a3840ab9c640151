"""Data sources, the canonical raw format, splits and the prepare stage's bad-input errors."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from genpipe.data.raw import DataError, read_raw, write_raw
from genpipe.data.sources import load_source
from genpipe.data.splits import stratified_split, to_tensor_images
from genpipe.lineage import dvc_md5

REPO = Path(__file__).resolve().parents[1]


def test_digits_export_is_byte_identical_and_matches_data_dvc(tmp_path):
    write_raw(load_source("digits"), tmp_path / "a")
    write_raw(load_source("digits"), tmp_path / "b")
    for name in ("pixels.npy", "shapes.npy", "labels.npy", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    recorded = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    assert dvc_md5(tmp_path / "a") == recorded


def test_raw_round_trip_keeps_mixed_shapes(tmp_path):
    data = load_source("digits")
    raw = read_raw(_write(data, tmp_path))
    assert len(raw.images) == 1797 and raw.images[0].shape == (8, 8, 1)
    assert raw.classes == [str(i) for i in range(10)]
    assert max(int(im.max()) for im in raw.images) == 255  # 0..16 scaled to the byte range


def _write(data, tmp_path):
    write_raw(data, tmp_path / "raw")
    return tmp_path / "raw"


def test_truncated_raw_is_named(tmp_path):
    root = _write(load_source("digits"), tmp_path)
    np.save(root / "pixels.npy", np.zeros(10, np.uint8))
    with pytest.raises(DataError, match="pixels.npy"):
        read_raw(root)
    (root / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="labels.npy"):
        read_raw(root)


def _idx(path: Path, arr: np.ndarray) -> None:
    dims = arr.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_torchvision_layout_keeps_the_official_test_set(tmp_path):
    raw_dir = tmp_path / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _idx(raw_dir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw_dir / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = load_source("fashion_mnist", tmp_path)
    assert len(data.images) == 40 and data.images[0].shape == (28, 28, 1)
    assert data.labels[:30].tolist() == (np.arange(30) % 10).tolist()
    assert data.origins[30] == "test:0" and len(data.classes) == 10
    assert data.test_indices == list(range(30, 40))


def test_cifar10_from_local_files(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": [*range(10)]}
        (base / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
    # our files cannot carry the official md5s, which torchvision checks
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_source("cifar10", tmp_path)
    assert len(data.images) == 60 and data.images[0].shape == (32, 32, 3)
    assert data.classes[2] == "c2" and data.labels[:12].tolist() == [*range(10), 0, 1]
    assert data.test_indices == list(range(50, 60))


def test_torchvision_source_offline_without_files_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="put the FashionMNIST files there"):
        load_source("fashion_mnist", tmp_path / "empty")


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, mode, size in (("cat", "L", (10, 12)), ("dog", "RGB", (16, 16))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / cls / f"{i}.png")
    return root


def test_image_folder_mixed_sizes_and_modes(tmp_path):
    data = load_source("folder", _folder(tmp_path))
    assert data.classes == ["cat", "dog"]
    assert data.images[0].shape == (10, 12, 1) and data.images[4].shape == (16, 16, 3)
    assert data.origins[0] == "cat/0.png"
    x = to_tensor_images(data, image_size=8, channels=1)
    assert x.shape == (8, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_corrupt_image_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "dog" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"dog/9.png"):
        load_source("folder", root)


def test_empty_class_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "bird").mkdir()
    with pytest.raises(DataError, match="class 'bird'"):
        load_source("folder", root)


def test_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), 40)
    a = stratified_split(labels, 0.7, 0.15, seed=3)
    b = stratified_split(labels, 0.7, 0.15, seed=3)
    c = stratified_split(labels, 0.7, 0.15, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    joined = np.concatenate(list(a.values()))
    assert len(np.unique(joined)) == len(labels)
    for split, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(labels[a[split]], minlength=5)
        assert (counts == round(frac * 40)).all()


def test_bad_test_indices_in_manifest_are_named(tmp_path):
    import json

    root = _write(load_source("digits"), tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    for bad in ([5, 3], [0, 1797], "all"):
        (root / "manifest.json").write_text(json.dumps({**manifest, "test_indices": bad}))
        with pytest.raises(DataError, match=r"manifest.json: test_indices must"):
            read_raw(root)
