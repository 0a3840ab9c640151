"""Dataset sources, each exported to the canonical raw format (see `raw.py`).

`digits` is bundled with scikit-learn, so the default pipeline needs no network. `mnist` reads
the four idx files (see `mnist.py`). The other torchvision sources read an existing local copy
under `path` and download only when it is missing (and the network allows). `folder` reads an
image folder with one sub-folder per class. Sources with an official test set record it.
`catalog.SOURCES` lists them all.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from genpipe.data.catalog import SOURCES
from genpipe.data.classes import check_classes
from genpipe.data.raw import DataError, RawDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
# sub-folder names that mean "already split", not a class
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def digits(path: Path | None = None) -> RawDataset:
    """scikit-learn's 1,797 8x8 handwritten digits; grey levels 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    scaled = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return RawDataset(
        images=list(scaled),
        labels=bunch.target.astype(np.int64),
        classes=[str(c) for c in bunch.target_names],
        source="digits",
        origins=[f"sklearn:{i}" for i in range(len(scaled))],
    )


def _torchvision(name: str, cls_name: str) -> Callable[[Path | None], RawDataset]:
    def load(path: Path | None = None) -> RawDataset:
        import torchvision.datasets as tvd

        root = Path(path or "data/downloads")
        cls = getattr(tvd, cls_name)
        images: list[np.ndarray] = []
        labels: list[int] = []
        origins: list[str] = []
        classes: list[str] = []
        for split, train in (("train", True), ("test", False)):
            try:
                ds = cls(str(root), train=train, download=False)
            except RuntimeError:
                try:
                    ds = cls(str(root), train=train, download=True)
                except Exception as exc:  # noqa: BLE001 - offline, blocked, partial download
                    raise DataError(
                        f"{name}: no local copy under {root} and the download failed ({exc}); "
                        f"put the {cls_name} files there (as torchvision lays them out) "
                        "and pass --path"
                    ) from None
            arr = np.asarray(ds.data)
            if arr.ndim == 3:
                arr = arr[..., None]
            images.extend(arr.astype(np.uint8))
            labels.extend(int(t) for t in ds.targets)
            origins.extend(f"{split}:{i}" for i in range(len(arr)))
            classes = list(ds.classes)
        test = [i for i, origin in enumerate(origins) if origin.startswith("test:")]
        return RawDataset(images, np.asarray(labels, np.int64), classes, name, origins, test)

    return load


def folder(path: Path | None = None) -> RawDataset:
    """An image folder: `path/<class>/<image>` (images may sit deeper); classes and files in
    sorted order. Hidden files and folders (a leading dot: macOS `._*` AppleDouble files,
    `.thumbnails/`, `.DS_Store`) are skipped; so are files without an image suffix."""
    if path is None:
        raise DataError("folder: needs --path pointing at a folder of class sub-folders")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"folder: {root} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p, root))
    if not class_dirs:
        raise DataError(f"folder: {root} has no class sub-folders (expected {root}/<class>/*.png)")
    _refuse_split_layout(root, class_dirs)
    images: list[np.ndarray] = []
    labels: list[int] = []
    origins: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden(p, class_dir)
        )
        if not files:
            raise DataError(f"folder: class '{class_dir.name}' ({class_dir}) has no images")
        for file in files:
            images.append(_read_image(file))
            labels.append(label)
            origins.append(file.relative_to(root).as_posix())
    return RawDataset(
        images, np.asarray(labels, np.int64), [d.name for d in class_dirs], "folder", origins
    )


def _hidden(path: Path, under: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def _refuse_split_layout(root: Path, class_dirs: list[Path]) -> None:
    """`root/train/<class>/...` would silently make "train" and "val" the classes."""
    splits = [d for d in class_dirs if d.name.lower() in SPLIT_NAMES]
    nested = [d for d in splits if any(p.is_dir() and not _hidden(p, d) for p in d.iterdir())]
    if len(splits) >= 2 or nested:
        names = ", ".join(f"{d.name}/" for d in splits)
        raise DataError(
            f"folder: {root} holds {names}: a dataset already split, whose split folders would "
            f"become the classes. Merge them into one folder per class ({root}/<class>/...) "
            f"or point --path at one of them (e.g. {splits[0]}); prepare makes its own split"
        )


def _read_image(file: Path) -> np.ndarray:
    """Read as uint8 HWC, grayscale as 1 channel and anything else as RGB. 16-bit and float
    grayscale are scaled to 0..255 (not clipped); images above Pillow's pixel limit (a
    decompression bomb, or far larger than any model here uses) are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                im.load()
                arr = _pixels(im, file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"folder: image {file} is too large to read safely ({exc}); downscale or remove it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"folder: cannot read image {file} ({exc}); remove or replace it") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _pixels(im: Image.Image, file: Path) -> np.ndarray:
    """uint8 levels: 16-bit grayscale (Pillow modes I;16* and I) scaled from 0..65535, float
    grayscale (F) from 0..1; 1-bit and 8-bit grayscale as L, anything else as RGB."""
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    if im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return np.asarray(im.convert("RGB"))
    values = np.asarray(im, dtype=np.float64)
    top = 1.0 if im.mode == "F" else 65535.0
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > top:
        raise DataError(
            f"folder: image {file} (mode {im.mode}) has values outside 0..{top:g}; "
            "save it as 8-bit, 16-bit or 0..1 float grayscale"
        )
    return np.rint(values * (255.0 / top)).astype(np.uint8)


fashion_mnist = _torchvision("fashion_mnist", "FashionMNIST")
cifar10 = _torchvision("cifar10", "CIFAR10")


def loader(name: str) -> Callable[[Path | None], RawDataset]:
    """The loader `catalog.SOURCES` names for `name`."""
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)}")
    module, function = SOURCES[name].split(":")
    return getattr(importlib.import_module(module), function)


def load_source(name: str, path: Path | None = None) -> RawDataset:
    """Load a source and check that every class can fill every split, before it is written."""
    data = loader(name)(path)
    check_classes(
        data.labels, data.classes, data.test_indices, f"{name} ({path})" if path else name
    )
    return data
