"""Deterministic stratified splits and image normalisation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genpipe.data.raw import DataError, RawDataset


def stratified_split(
    labels: np.ndarray, train_frac: float, val_frac: float, seed: int
) -> dict[str, np.ndarray]:
    """Per class: a seeded permutation cut at the fractions, with at least one image in each
    split (a class needs 3, see `classes.py`). Sorted indices per split, so the order on disk
    is the source order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_val = _one_to(round(val_frac * n), n - 2)  # leave one for train and one for test
        n_train = _one_to(round(train_frac * n), n - n_val - 1)
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def official_split(
    labels: np.ndarray, test_indices: list[int], val_frac: float, seed: int
) -> dict[str, np.ndarray]:
    """The source's own test set as test; val drawn per class from the rest by `val_frac`
    (at least one image per class), train the remainder. `train_frac` plays no part."""
    rng = np.random.Generator(np.random.PCG64(seed))
    in_test = np.zeros(len(labels), bool)
    in_test[test_indices] = True
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for cls in np.unique(labels):
        idx = np.flatnonzero((labels == cls) & ~in_test)
        idx = idx[rng.permutation(len(idx))]
        n_val = _one_to(round(val_frac * len(idx)), len(idx) - 1)
        parts["val"].append(idx[:n_val])
        parts["train"].append(idx[n_val:])
    split = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    return {**split, "test": np.flatnonzero(in_test).astype(np.int64)}


def _one_to(count: int, most: int) -> int:
    """`count` kept within 1..most, so a small class still gives every split an image."""
    return min(max(1, count), most)


def split_indices(
    labels: np.ndarray,
    test_indices: list[int] | None,
    train_frac: float,
    val_frac: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """The official split when the source has a test set, else the stratified one."""
    if test_indices is not None:
        return official_split(labels, test_indices, val_frac, seed)
    return stratified_split(labels, train_frac, val_frac, seed)


def to_tensor_images(data: RawDataset, image_size: int, channels: int) -> np.ndarray:
    """uint8 HWC images of any size -> float32 (N, C, S, S) in [0, 1]."""
    out = np.empty((len(data.images), channels, image_size, image_size), np.float32)
    for i, im in enumerate(data.images):
        if im.ndim != 3 or im.shape[2] not in (1, 3, 4) or min(im.shape[:2]) < 1:
            raise DataError(
                f"{data.origins[i]}: image of shape {im.shape} cannot be converted to "
                f"{channels}x{image_size}x{image_size} (need HxWx1, HxWx3 or HxWx4)"
            )
        x = torch.tensor(im[..., :3]).permute(2, 0, 1).float() / 255.0
        if x.shape[0] == 3 and channels == 1:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        elif x.shape[0] == 1 and channels == 3:
            x = x.expand(3, -1, -1)
        if x.shape[1:] != (image_size, image_size):
            x = F.interpolate(
                x[None],
                size=(image_size, image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
        out[i] = x.clamp(0, 1).numpy()
    return out
