"""The prepared dataset on disk: data/prepared/{train,val,test}/{images,labels}.npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genpipe.data.raw import DataError

PREPARED = Path("data/prepared")
SPLITS = ("train", "val", "test")


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images.astype(np.float32), allow_pickle=False)
    np.save(folder / "labels.npy", labels.astype(np.int64), allow_pickle=False)


def load_split(split: str, root: Path = PREPARED) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 of one split."""
    folder = root / split
    try:
        x = np.load(folder / "images.npy", allow_pickle=False)
        y = np.load(folder / "labels.npy", allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: missing; run `dvc repro prepare` first") from None
    except ValueError as exc:
        raise DataError(
            f"{folder}: corrupt prepared split ({exc}); run `dvc repro prepare`"
        ) from None
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{folder}: images {x.shape} and labels {y.shape} disagree")
    return torch.from_numpy(x), torch.from_numpy(y)
