"""Dataset sources, each exported to the canonical raw format (see `raw.py`).

`digits` is bundled with scikit-learn, so the default pipeline needs no network. The
torchvision sources read an existing local copy under `path` and download only when it is
missing (and the network allows). `folder` reads an image folder with one sub-folder per class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from genpipe.data.raw import DataError, RawDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}


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
        return RawDataset(images, np.asarray(labels, np.int64), classes, name, origins)

    return load


def folder(path: Path | None = None) -> RawDataset:
    """An image folder: `path/<class>/<image>`; classes and files in sorted order."""
    if path is None:
        raise DataError("folder: needs --path pointing at a folder of class sub-folders")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"folder: {root} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"folder: {root} has no class sub-folders (expected {root}/<class>/*.png)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    origins: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"folder: class '{class_dir.name}' ({class_dir}) has no images")
        for file in files:
            images.append(_read_image(file))
            labels.append(label)
            origins.append(file.relative_to(root).as_posix())
    return RawDataset(
        images, np.asarray(labels, np.int64), [d.name for d in class_dirs], "folder", origins
    )


def _read_image(file: Path) -> np.ndarray:
    """Read as uint8 HWC, grayscale as 1 channel and anything else as RGB."""
    try:
        with Image.open(file) as im:
            im.load()
            mode = "L" if im.mode in ("1", "L", "I;16", "I", "F") else "RGB"
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"folder: cannot read image {file} ({exc}); remove or replace it") from None
    return arr[..., None] if arr.ndim == 2 else arr


SOURCES: dict[str, Callable[[Path | None], RawDataset]] = {
    "digits": digits,
    "mnist": _torchvision("mnist", "MNIST"),
    "fashion_mnist": _torchvision("fashion_mnist", "FashionMNIST"),
    "cifar10": _torchvision("cifar10", "CIFAR10"),
    "folder": folder,
}


def load_source(name: str, path: Path | None = None) -> RawDataset:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[name](path)
