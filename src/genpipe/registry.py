"""The registered generator (an MLflow pyfunc) and the promotion gate.

Contract of `genpipe-generator`: input a pandas DataFrame with an int column `label` and an
optional int column `seed` (default 0); output float32 (N, C, H, W) in [0, 1], the scale and
orientation of data/prepared. Row i depends only on (label_i, seed_i).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from genpipe.tracking import store

MODEL_NAME = "genpipe-generator"
CANDIDATE, CHAMPION = "candidate", "champion"


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """Rebuilds the generator from its two model files (artifacts `tokenizer` and `prior`)."""

    def load_context(self, context: Any) -> None:
        from genpipe.artifacts.generator import load_generator
        from genpipe.runtime import deterministic_kernels

        deterministic_kernels()
        self.generator = load_generator(
            Path(context.artifacts["tokenizer"]), Path(context.artifacts["prior"])
        )
        prior = self.generator.prior
        self.num_classes = int(prior.num_classes)  # type: ignore[arg-type]

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> np.ndarray:
        frame = pd.DataFrame(model_input)
        if "label" not in frame.columns:
            raise ValueError(
                f"input needs an int column 'label'; got columns {list(frame.columns)}"
            )
        labels = frame["label"].astype("int64").to_numpy()
        if len(labels) == 0:
            raise ValueError("input has no rows; send at least one {'label': int}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1}; got {sorted(set(labels))}"
            )
        seeds = (
            frame["seed"].astype("int64").to_numpy()
            if "seed" in frame.columns
            else np.zeros_like(labels)
        )
        images = [
            self.generator(torch.tensor([int(label)]), torch.Generator().manual_seed(int(seed)))
            for label, seed in zip(labels, seeds)
        ]
        return torch.cat(images).clamp(0, 1).numpy().astype(np.float32)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] | None


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    primary: str,
    lower_is_better: bool,
    guard: str = "class_consistency",
) -> Decision:
    """Promote the first model; later ones only if they beat the champion on `primary` and
    are no worse on `guard`, both measured on the same evaluation."""
    if champion is None:
        return Decision(True, "no champion yet: the first model is promoted", candidate, None)
    c, h = candidate[primary], champion[primary]
    better = c < h if lower_is_better else c > h
    guard_ok = candidate[guard] >= champion[guard]
    if better and guard_ok:
        reason = (
            f"{primary} {c:.4g} beats champion's {h:.4g}; "
            f"{guard} {candidate[guard]:.4g} >= {champion[guard]:.4g}"
        )
    elif not better:
        reason = f"{primary} {c:.4g} does not beat champion's {h:.4g}"
    else:
        reason = f"{guard} {candidate[guard]:.4g} is below champion's {champion[guard]:.4g}"
    return Decision(better and guard_ok, reason, candidate, champion)


def log_generator(tokenizer: Path, prior: Path, num_classes: int) -> str:
    """Log the pyfunc generator in the active run and register it; returns the new version."""
    import genpipe

    example = pd.DataFrame(
        {
            "label": np.arange(min(2, num_classes), dtype=np.int64),
            "seed": [0, 1][: min(2, num_classes)],
        }
    )
    info = mlflow.pyfunc.log_model(
        name="generator",
        python_model=GeneratorModel(),
        artifacts={"tokenizer": str(tokenizer), "prior": str(prior)},
        code_paths=[str(Path(genpipe.__file__).parent)],
        input_example=example,
        pip_requirements=store.model_requirements(),
        registered_model_name=MODEL_NAME,
    )
    return str(info.registered_model_version)


def champion() -> tuple[str, Any] | None:
    """The current champion's version and its generator, loaded as serving loads it."""
    client = store.client()
    try:
        mv = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except Exception:  # noqa: BLE001 - no registered model or no alias yet
        return None
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    return str(mv.version), model.unwrap_python_model().generator


def set_aliases(version: str, promote: bool, tags: dict[str, Any]) -> None:
    """Tag the version, alias it `candidate`, and `champion` if promoted (always last)."""
    client = store.client()
    for k, v in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, k, str(v))
    client.set_registered_model_alias(MODEL_NAME, CANDIDATE, version)
    if promote:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
