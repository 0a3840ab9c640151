"""Pictures people look at: image grids and curves, as arrays, PNG files and CSV for
`dvc plots`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: torch.Tensor | np.ndarray, nrow: int, pad: int = 1, scale: int = 4
) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H, nrow*W, 3) grid, upscaled for small images."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad) * 0.5
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y0 : y0 + h, x0 : x0 + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return arr.repeat(scale, axis=0).repeat(scale, axis=1)


def class_grid(
    images: torch.Tensor,
    per_class: int,
    num_classes: int,
    show: int = 10,
    names: list[str] | None = None,
) -> np.ndarray:
    """Class-ordered samples (num_classes * per_class, C, H, W) -> a grid with the first `show`
    of each class, one class per row, each row labelled with its class (`names`, else its
    index), so a wrong class in a row is seen without counting rows."""
    show = min(show, per_class)
    rows = images.reshape(num_classes, per_class, *images.shape[1:])[:, :show].flatten(0, 1)
    grid = image_grid(rows, nrow=show)
    labels = names if names is not None else [str(c) for c in range(num_classes)]
    return label_rows(grid, labels)


def label_rows(grid: np.ndarray, labels: list[str], width: int = 36) -> np.ndarray:
    """Prepend a column of `width` pixels naming each of the grid's equal-height rows."""
    height = grid.shape[0] / len(labels)
    column = Image.new("RGB", (width, grid.shape[0]), (255, 255, 255))
    draw = ImageDraw.Draw(column)
    font = ImageFont.load_default(size=max(8, min(int(height * 0.6), 16)))
    for i, label in enumerate(labels):
        top = int(i * height + height / 2)
        draw.text((width // 2, top), label[:5], fill=(0, 0, 0), font=font, anchor="mm")
    return np.concatenate([np.asarray(column), grid], axis=1)


def save_png(array: np.ndarray, path: Path) -> None:
    """PNG written by Pillow with no metadata, so the bytes depend only on the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False)


def write_curve(rows: list[dict[str, float]], path: Path) -> None:
    """A CSV that `dvc plots` draws (a curve over steps, a confusion matrix, a histogram)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
