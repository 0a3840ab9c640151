"""Image folders as users hand them over: junk files, tiny or single classes, split layouts,
16-bit and float images, decompression bombs. Each is skipped (documented) or refused by name."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genpipe.config import parse_params
from genpipe.data.raw import DataError, write_raw
from genpipe.data.sources import load_source
from genpipe.data.splits import stratified_split
from genpipe.stages import prepare


def make_folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(arr, "L").save(root / cls / f"{i}.png")
    return root


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 3, "dog": 3})
    # what macOS leaves behind: AppleDouble companions (not images) and a thumbnail cache
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    make_folder(root / "dog" / ".thumbnails", {"x": 2})
    make_folder(root, {".hidden_class": 3})
    data = load_source("folder", root)
    assert data.classes == ["cat", "dog"]
    assert data.origins == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]


@pytest.mark.parametrize("n", [3, 4, 5])
def test_small_classes_fill_every_split(tmp_path, monkeypatch, mlflow_uri, n):
    """Classes of 3 to 5 images used to leave val or test empty and crash prepare."""
    root = make_folder(tmp_path / "imgs", {"a": n, "b": n})
    write_raw(load_source("folder", root), tmp_path / "data/raw")
    monkeypatch.chdir(tmp_path)
    card = prepare.run(parse_params({}), tmp_path)
    per_class = [card["splits"][s]["per_class"] for s in ("train", "val", "test")]
    assert per_class == [{"a": n - 2, "b": n - 2}, {"a": 1, "b": 1}, {"a": 1, "b": 1}]


def test_split_sizes_keep_the_fractions_for_large_classes_and_one_each_for_tiny_ones():
    labels = np.repeat(np.arange(4), [3, 4, 5, 200])
    split = stratified_split(labels, 0.7, 0.15, seed=0)
    for part in split.values():
        assert (np.bincount(labels[part], minlength=4) >= 1).all()
    assert [np.bincount(labels[split[s]])[3] for s in ("train", "val", "test")] == [140, 30, 30]


def test_class_of_two_images_is_refused_at_export(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 5, "dog": 2})
    with pytest.raises(DataError, match=r"imgs\).*class 'dog' has 2 image.*at least 3"):
        load_source("folder", root)


def test_one_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 5})
    with pytest.raises(DataError, match=r"imgs\): 1 class \('cat'\).*at least 2"):
        load_source("folder", root)


@pytest.mark.parametrize(
    "layout",
    [
        {"train/cat": 3, "train/dog": 3, "val/cat": 3, "val/dog": 3},
        {"train": 3, "test": 3},  # split folders holding images directly
        {"Train/cat": 3, "Train/dog": 3, "extra": 3},  # one split folder with classes inside
    ],
)
def test_split_layout_is_refused_with_advice(tmp_path, layout):
    root = make_folder(tmp_path / "imgs", layout)
    with pytest.raises(DataError, match=r"imgs holds .*rain/.*already split.*point --path"):
        load_source("folder", root)


def _save_and_load(tmp_path: Path, image: Image.Image, name: str) -> np.ndarray:
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    image.save(root / "a" / name)
    data = load_source("folder", root)
    return data.images[data.origins.index(f"a/{name}")]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gradient = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = _save_and_load(tmp_path, Image.fromarray(gradient), "deep.png")
    assert got.shape == (256, 256, 1) and got.dtype == np.uint8
    assert np.array_equal(got[..., 0], np.rint(gradient / 257.0).astype(np.uint8))
    assert (got == 255).mean() < 0.01  # convert("L") made 99.6% of it 255


def test_float_grayscale_is_scaled_from_unit_range(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    got = _save_and_load(tmp_path, Image.fromarray(ramp), "float.tif")
    assert np.array_equal(got[..., 0], np.rint(ramp * 255.0).astype(np.uint8))


def test_32_bit_values_beyond_16_bit_are_refused_by_name(tmp_path):
    big = (np.arange(64, dtype=np.int32) * 100_000).reshape(8, 8)
    with pytest.raises(DataError, match=r"a/wide.tif \(mode I\) has values outside 0..65535"):
        _save_and_load(tmp_path, Image.fromarray(big), "wide.tif")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height 1-bit pixels: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [10_000, 40_000])  # above Pillow's limit, and above twice it
def test_huge_image_is_refused_by_name(tmp_path, side):
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    _png_header_only(root / "b" / "bomb.png", side, side)
    with pytest.raises(DataError, match=r"image .*b/bomb.png is too large to read safely"):
        load_source("folder", root)
