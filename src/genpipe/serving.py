"""The registered generator as MLflow serves it: a "models from code" pyfunc.

MLflow logs this file as the model's code (registry.log_generator) and runs it to load the
model, so nothing is unpickled: the model's two artifacts are genpipe model files, read with
`torch.load(weights_only=True)` (modelio).

Contract of `genpipe-generator`: input a pandas DataFrame with an int column `label` and an
optional int column `seed` (default 0); output float32 (N, C, H, W) in [0, 1], the scale and
orientation of data/prepared. Row i depends only on (label_i, seed_i).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema, TensorSpec


def signature(image_shape: tuple[int, ...]) -> ModelSignature:
    """`label` required, `seed` optional; images (N, *image_shape) float32."""
    inputs = Schema([ColSpec(DataType.long, "label"), ColSpec(DataType.long, "seed", False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))])
    return ModelSignature(inputs=inputs, outputs=outputs)


class GeneratorModel(PythonModel):
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


if __name__ != "genpipe.serving":  # MLflow runs this file as the model's code
    set_model(GeneratorModel())
