"""The `judges` output: two frozen classifiers, `reward` (for RL) and `evaluator`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpipe.artifacts import JUDGES
from genpipe.config import Judge, Params
from genpipe.modelio import ModelFileError, load_model
from genpipe.models.classifier import Classifier


def load_judge(root: Path, role: str, num_classes: int) -> Classifier:
    """A trained judge, frozen; refused when it was trained for another number of classes."""
    path = root / JUDGES / f"{role}.pt"
    model, blob = load_model(path, "classifier", Classifier)
    assert isinstance(model, Classifier)
    if blob["arch"]["num_classes"] != num_classes:
        raise ModelFileError(
            f"{path}: judges {blob['arch']['num_classes']} classes but the data has "
            f"{num_classes}; re-run `dvc repro`"
        )
    return model.requires_grad_(False)  # load_model returns it in eval mode


def judge_arch(cfg: Judge, params: Params, num_classes: int) -> dict[str, Any]:
    """Constructor arguments of a judge `Classifier`, as recorded in its model file."""
    return {
        "arch": cfg.arch,
        "in_channels": params.prepare.channels,
        "image_size": params.prepare.image_size,
        "num_classes": num_classes,
        "width": cfg.width,
        "dropout": cfg.dropout,
    }
