"""Where runs live: the MLflow tracking URI, the experiment and a configured client.

Default store: a SQLite file at the project root (absolute URI, so `dvc exp run --temp`
in .dvc/tmp/exps still finds it) with artifacts beside it in `mlartifacts/`.
`MLFLOW_TRACKING_URI` points everything at a server instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

EXPERIMENT = os.environ.get("GENPIPE_EXPERIMENT", "genpipe")
MODEL_PACKAGES = ("torch", "numpy", "pandas")  # what loading a model imports


def model_requirements() -> list[str]:
    """Exact pins of the packages a logged genpipe model needs. Given explicitly, MLflow skips
    inferring them, which loads the model again in a subprocess (seconds per logged model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_PACKAGES]


def project_root(start: Path | None = None) -> Path:
    """The main project folder, also from inside a `dvc exp run --temp` copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts and "exps" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return here


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def mlflow() -> Any:
    """The MLflow module configured for this project (imported lazily: it costs ~2 s)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow as mlflow_module

    mlflow_module.set_tracking_uri(tracking_uri())
    if mlflow_module.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = None
        if tracking_uri().startswith("sqlite:"):
            artifacts = (project_root() / "mlartifacts").as_uri()
        mlflow_module.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow_module.set_experiment(EXPERIMENT)
    return mlflow_module


def client() -> Any:
    """An MlflowClient on this project's store."""
    return mlflow().MlflowClient()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested params and metrics as MLflow keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
