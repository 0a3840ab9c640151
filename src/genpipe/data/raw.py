"""The canonical raw dataset format under data/raw, the only thing data.dvc versions.

Every source is exported to the same four files, written byte-for-byte deterministically
(`.npy` arrays and sorted, compact JSON), so the same source gives the same DVC hash on
any machine:

- pixels.npy   uint8, all images' pixels concatenated (HWC order, image after image)
- shapes.npy   int64 (N, 3): each image's (height, width, channels); sizes may differ
- labels.npy   int64 (N,): class index into classes.json
- manifest.json  source, class names, per-image origin (file path for folders) and, for
                 sources with an official test set (MNIST, ...), `test_indices`: the sorted
                 indices of its images, which `prepare` keeps as the test split. Sources
                 without one leave the key out, so their bytes are unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILES = ("pixels.npy", "shapes.npy", "labels.npy", "manifest.json")


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class RawDataset:
    images: list[np.ndarray]  # each uint8 (H, W, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    source: str
    origins: list[str]  # where each image came from (file path, or "split:index")
    test_indices: list[int] | None = None  # the source's official test images, if it has them

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.labels) == len(self.origins)):
            raise DataError(
                f"{self.source}: {len(self.images)} images, {len(self.labels)} labels and "
                f"{len(self.origins)} origins must have the same length"
            )
        problem = _bad_test_indices(self.test_indices, len(self.images))
        if problem:
            raise DataError(f"{self.source}: test_indices {problem}")


def _bad_test_indices(indices: object, n: int) -> str | None:
    """Why `indices` is not a sorted list of distinct image indices below `n` (None if it is)."""
    if indices is None:
        return None
    if not isinstance(indices, list) or not all(type(i) is int for i in indices):
        return "must be a list of image indices"
    if any(b <= a for a, b in zip(indices, indices[1:])) or (
        indices and not 0 <= indices[0] <= indices[-1] < n
    ):
        return f"must be sorted, distinct and within 0..{n - 1}"
    return None


def first_per_class(data: RawDataset, per_class: int) -> RawDataset:
    """The first `per_class` images of each class in each split (the official test set, when
    the source has one, counts as its own split), in the source's order: a deterministic
    subset of a large source for smoke runs (`genpipe data fetch --per-class N`)."""
    if per_class < 1:
        raise DataError(f"--per-class must be >= 1, got {per_class}")
    test = set(data.test_indices or ())
    seen: dict[tuple[bool, int], int] = {}
    keep = []
    for i, y in enumerate(data.labels.tolist()):
        key = (i in test, y)
        if seen.get(key, 0) < per_class:
            seen[key] = seen.get(key, 0) + 1
            keep.append(i)
    return RawDataset(
        images=[data.images[i] for i in keep],
        labels=data.labels[keep],
        classes=data.classes,
        source=data.source,
        origins=[data.origins[i] for i in keep],
        test_indices=None
        if data.test_indices is None
        else [j for j, i in enumerate(keep) if i in test],
    )


def write_raw(data: RawDataset, out: Path) -> None:
    """Write `data` to `out` atomically: a sibling temp folder renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pixels = (
        np.concatenate([im.reshape(-1) for im in data.images])
        if data.images
        else np.zeros(0, np.uint8)
    )
    shapes = np.array([im.shape for im in data.images], dtype=np.int64).reshape(-1, 3)
    np.save(tmp / "pixels.npy", pixels.astype(np.uint8), allow_pickle=False)
    np.save(tmp / "shapes.npy", shapes, allow_pickle=False)
    np.save(tmp / "labels.npy", data.labels.astype(np.int64), allow_pickle=False)
    manifest: dict[str, object] = {
        "source": data.source,
        "classes": data.classes,
        "origins": data.origins,
    }
    if data.test_indices is not None:
        manifest["test_indices"] = data.test_indices
    (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=0) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing; re-create data/raw with `genpipe data fetch SOURCE`")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any corrupt file gets the same clear message
        raise DataError(
            f"{path}: unreadable ({exc}); restore it with `dvc checkout data.dvc`"
        ) from None


def read_raw(root: Path) -> RawDataset:
    """Read and validate data/raw; every inconsistency names the file at fault."""
    pixels = _load_npy(root / "pixels.npy")
    shapes = _load_npy(root / "shapes.npy")
    labels = _load_npy(root / "labels.npy")
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        classes, origins, source = manifest["classes"], manifest["origins"], manifest["source"]
        test_indices = manifest.get("test_indices")
    except FileNotFoundError:
        raise DataError(f"{manifest_path}: missing; re-create data/raw") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path}: corrupt ({exc!r}); restore it") from None
    if pixels.dtype != np.uint8 or shapes.ndim != 2 or shapes.shape[1:] != (3,):
        raise DataError(f"{root}: pixels.npy must be uint8 and shapes.npy (N, 3)")
    if len(labels) != len(shapes) or len(origins) != len(shapes):
        raise DataError(
            f"{root}: {len(shapes)} shapes, {len(labels)} labels, {len(origins)} origins disagree"
        )
    sizes = shapes.prod(axis=1)
    if (shapes <= 0).any() or int(sizes.sum()) != pixels.size:
        raise DataError(f"{root / 'pixels.npy'}: size does not match shapes.npy (truncated?)")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{root / 'labels.npy'}: labels outside 0..{len(classes) - 1}")
    if problem := _bad_test_indices(test_indices, len(labels)):
        raise DataError(f"{manifest_path}: test_indices {problem}; restore it")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    images = [
        pixels[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i])) for i in range(len(shapes))
    ]
    return RawDataset(images, labels, list(classes), source, list(origins), test_indices)
