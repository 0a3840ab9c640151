"""Stage `prepare`: data/raw -> stratified train/val/test in [0, 1] plus a dataset card."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from genpipe import artifacts, viz
from genpipe.config import Params
from genpipe.data.classes import check_classes
from genpipe.data.prepared import SPLITS, write_split
from genpipe.data.raw import read_raw
from genpipe.data.splits import split_indices, to_tensor_images
from genpipe.outputs import write_json
from genpipe.spec import StageSpec

SPEC = StageSpec(
    "prepare",
    params=("prepare",),
    deps=(artifacts.RAW,),
    outs=(artifacts.PREPARED,),
    metrics=artifacts.metrics("prepare"),
)


def build_card(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], source: str
) -> dict[str, Any]:
    """Counts per class per split, shape, value range and a content digest."""
    digest = hashlib.sha256()
    card: dict[str, Any] = {"source": source, "classes": classes, "splits": {}}
    for name, (x, y) in splits.items():
        digest.update(x.tobytes())
        digest.update(y.tobytes())
        counts = np.bincount(y, minlength=len(classes))
        card["splits"][name] = {
            "count": int(len(y)),
            "per_class": {c: int(n) for c, n in zip(classes, counts)},
            "min": float(x.min()),
            "max": float(x.max()),
            "mean": round(float(x.mean()), 6),
        }
    card["shape"] = list(next(iter(splits.values()))[0].shape[1:])
    card["digest"] = digest.hexdigest()
    return card


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.prepare
    raw = read_raw(root / artifacts.RAW)
    check_classes(raw.labels, raw.classes, raw.test_indices, str(artifacts.RAW))
    images = to_tensor_images(raw, cfg.image_size, cfg.channels)
    # a source's official test set stays the test split (then train_frac plays no part)
    index = split_indices(
        raw.labels, raw.test_indices, cfg.train_frac, cfg.val_frac, params.base.seed
    )
    splits = {s: (images[index[s]], raw.labels[index[s]]) for s in SPLITS}
    card = build_card(splits, raw.classes, raw.source)

    with SPEC.record(params, root) as (run, (out, metrics_path)):
        for s in SPLITS:
            write_split(out / s, *splits[s])
        write_json(out / "card.json", card)
        metrics = {
            "num_classes": len(raw.classes),
            **{f"{s}_count": card["splits"][s]["count"] for s in SPLITS},
        }
        write_json(metrics_path, metrics)  # the card is data/prepared/card.json, not a metric
        run.log_metrics(metrics)
        for s in SPLITS:
            run.log_dataset(
                f"{raw.source}-{s}", card["digest"][:16], root / artifacts.PREPARED / s, s
            )
        run.log_image(_class_grid(*splits["train"], raw.classes), "train_samples.png")
        run.log_artifact(out / "card.json")
    return card


def _class_grid(x: np.ndarray, y: np.ndarray, classes: list[str], per_class: int = 8) -> np.ndarray:
    """One row per class, named, for a first look at the data."""
    picks = [x[np.flatnonzero(y == c)[:per_class]] for c in range(len(classes))]
    rows = [
        np.concatenate([p, np.zeros((per_class - len(p), *x.shape[1:]), x.dtype)]) for p in picks
    ]
    grid = viz.image_grid(np.concatenate(rows), nrow=per_class)
    return viz.label_rows(grid, classes)
