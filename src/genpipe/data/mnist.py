"""MNIST read straight from its four idx files: no torchvision, no download.

The files may sit in torchvision's layout (`<root>/MNIST/raw/`) or directly in `<root>`,
each gzipped or not. Every file is checked against the md5 of the official (gunzipped) file
before use, so a truncated or foreign copy is refused by name instead of giving other data.
The official 60,000/10,000 split is kept: the test images are recorded as `test_indices`.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from genpipe.data.raw import DataError, RawDataset

# md5 of each gunzipped file, the well-known values of the official distribution
MNIST_MD5: Mapping[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
PARTS = (("train", "train"), ("test", "t10k"))  # (split, file prefix)
UBYTE = 0x08  # the idx type code of unsigned bytes, the only one MNIST uses


def mnist(path: Path | None = None, checksums: Mapping[str, str] = MNIST_MD5) -> RawDataset:
    """The 60,000 training then 10,000 test images, 28x28x1, classes "0".."9"."""
    folder = find_folder(Path(path or "data/downloads"))
    images, labels = [], []
    for _, prefix in PARTS:
        x = read_idx(folder, f"{prefix}-images-idx3-ubyte", 3, checksums)
        y = read_idx(folder, f"{prefix}-labels-idx1-ubyte", 1, checksums)
        if len(x) != len(y):
            raise DataError(
                f"mnist: {folder}/{prefix}-images-idx3-ubyte has {len(x)} images but "
                f"{prefix}-labels-idx1-ubyte has {len(y)} labels; use files of one release"
            )
        if len(y) and y.max() > 9:
            raise DataError(f"mnist: {folder}/{prefix}-labels-idx1-ubyte has labels above 9")
        images.append(x)
        labels.append(y)
    n_train, n_test = len(labels[0]), len(labels[1])
    origins = [f"{split}:{i}" for (split, _), y in zip(PARTS, labels) for i in range(len(y))]
    return RawDataset(
        images=list(np.concatenate(images)[..., None]),
        labels=np.concatenate(labels).astype(np.int64),
        classes=[str(c) for c in range(10)],
        source="mnist",
        origins=origins,
        test_indices=list(range(n_train, n_train + n_test)),
    )


def find_folder(root: Path) -> Path:
    """`<root>/MNIST/raw` (torchvision's layout) when it holds any idx file, else `root`."""
    for folder in (root / "MNIST" / "raw", root):
        if any((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in MNIST_MD5):
            return folder
    raise DataError(
        f"mnist: no MNIST idx files in {root / 'MNIST' / 'raw'} or {root}; put the four files "
        f"({', '.join(MNIST_MD5)}, gzipped or not) in one of them and pass --path"
    )


def read_idx(folder: Path, name: str, ndim: int, checksums: Mapping[str, str]) -> np.ndarray:
    """One idx file (`name` or `name.gz`) as a uint8 array, checked against its md5."""
    plain, gz = folder / name, folder / f"{name}.gz"
    file = plain if plain.is_file() else gz
    if not file.is_file():
        raise DataError(f"mnist: {plain} (or {gz.name}) is missing; add it and run again")
    try:
        blob = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"mnist: {file} is not a readable gzip file ({exc}); replace it") from None
    expected = checksums.get(name)
    actual = hashlib.md5(blob).hexdigest()
    if expected is not None and actual != expected:
        raise DataError(
            f"mnist: {file} has md5 {actual} (gunzipped), the official file has {expected}; "
            "it is damaged or not MNIST: replace it with an intact copy"
        )
    return _parse_idx(blob, file, ndim)


def _parse_idx(blob: bytes, file: Path, ndim: int) -> np.ndarray:
    """The idx format: 2 zero bytes, type code, number of dims, big-endian uint32 dims, data."""
    header = 4 + 4 * ndim
    if len(blob) < header or blob[:2] != b"\0\0" or blob[2] != UBYTE or blob[3] != ndim:
        raise DataError(
            f"mnist: {file} is not an idx file of unsigned bytes with {ndim} dimension(s)"
        )
    dims = tuple(int(d) for d in np.frombuffer(blob, ">u4", count=ndim, offset=4))
    if len(blob) - header != int(np.prod(dims)):
        raise DataError(
            f"mnist: {file} holds {len(blob) - header} data bytes but its header says {dims}"
        )
    return np.frombuffer(blob, np.uint8, offset=header).reshape(dims)
