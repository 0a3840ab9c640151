"""Pictures and plot declarations: labelled sample grids, each figure declared once in dvc.yaml,
and the codebook-usage histogram."""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
import torch
import yaml

from genpipe import viz
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.stages import tokenizer
from tests.conftest import REPO


def _label_column(grid: np.ndarray, rows: int, row: int, width: int = 36) -> np.ndarray:
    height = grid.shape[0] // rows
    return grid[row * height : (row + 1) * height, :width]


def test_class_grid_names_each_row():
    images = torch.rand(3 * 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = viz.image_grid(images.reshape(3, 4, 1, 8, 8)[:, :4].flatten(0, 1), nrow=4)
    grid = viz.class_grid(images, per_class=4, num_classes=3)
    assert grid.shape == (plain.shape[0], plain.shape[1] + 36, 3)
    assert np.array_equal(grid[:, 36:], plain)  # the samples themselves are untouched
    columns = [_label_column(grid, 3, r) for r in range(3)]
    assert all((c < 128).any() for c in columns), "a row has no label drawn"
    assert not np.array_equal(columns[0], columns[1]), "rows 0 and 1 carry the same label"


def test_class_grid_uses_the_given_names():
    images = torch.zeros(2 * 2, 1, 8, 8)
    same = viz.class_grid(images, 2, 2, names=["cat", "cat"])
    other = viz.class_grid(images, 2, 2, names=["cat", "dog"])
    assert np.array_equal(_label_column(same, 2, 0), _label_column(same, 2, 1))
    assert not np.array_equal(_label_column(other, 2, 0), _label_column(other, 2, 1))


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_figure_is_declared_once_and_made_by_a_stage():
    dvc = _dvc_yaml()
    assert all("plots" not in stage for stage in dvc["stages"].values()), (
        "a stage-level plots entry makes `dvc plots` draw its files a second time"
    )
    outs = [
        PurePosixPath(next(iter(o)) if isinstance(o, dict) else o)
        for stage in dvc["stages"].values()
        for o in stage.get("outs", [])
    ]
    drawn: list[tuple[str, str]] = []
    for entry in dvc["plots"]:
        if isinstance(entry, str):
            drawn.append((entry, ""))
            continue
        ((_, spec),) = entry.items()
        for path, ys in spec["y"].items():
            drawn += [(path, y) for y in ([ys] if isinstance(ys, str) else ys)]
    assert len(drawn) == len(set(drawn)), "a curve is drawn twice"
    for path, _ in drawn:
        assert any(PurePosixPath(path).is_relative_to(o) for o in outs), f"{path}: no stage"
    files = {p for p, _ in drawn}
    for stage in ("pretrain", "tokenizer", "prior"):
        assert f"plots/{stage}/loss.csv" in files
    assert {"plots/judges/confusion_reward.csv", "plots/judges/confusion_evaluator.csv"} <= files
    kl = next(e for e in dvc["plots"] if isinstance(e, dict) and "KL" in next(iter(e)))
    assert set(next(iter(kl.values()))["y"]["plots/finetune/reward.csv"]) == {
        "kl_window",
        "kl_bound",
    }


def test_codebook_usage_counts_every_code_most_used_first():
    torch.manual_seed(0)
    model = VQAutoencoder(1, (4, 8), 0, 4, "vq", codebook_size=16, kmeans_init=False).eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = tokenizer.codebook_usage(model, x)
    codes = model.encode_codes(x)
    assert [r["rank"] for r in rows] == list(range(16))
    assert sorted(r["code"] for r in rows) == list(range(16))
    assert sum(r["count"] for r in rows) == codes.numel()
    counts = [r["count"] for r in rows]
    assert counts == sorted(counts, reverse=True)
    expected = torch.bincount(codes.flatten(), minlength=16)
    assert all(expected[r["code"]] == r["count"] for r in rows)
