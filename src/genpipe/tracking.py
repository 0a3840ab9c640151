"""The one module that talks to MLflow: stage runs, lineage tags, pictures and models.

Default store: a SQLite file at the project root (absolute URI, so `dvc exp run --temp`
in .dvc/tmp/exps still finds it) with artifacts beside it in `mlartifacts/`.
`MLFLOW_TRACKING_URI` points everything at a server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genpipe import lineage
from genpipe.config import Params
from genpipe.outputs import write_json

EXPERIMENT = os.environ.get("GENPIPE_EXPERIMENT", "genpipe")


def project_root(start: Path | None = None) -> Path:
    """The main project folder, also from inside a `dvc exp run --temp` copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts and "exps" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return here


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def _mlflow() -> Any:
    """Import MLflow configured for this project (imported lazily: it costs ~2 s)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        artifacts = None
        if tracking_uri().startswith("sqlite:"):
            artifacts = (project_root() / "mlartifacts").as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """Handle a stage uses to record its run; created by `stage_run`."""

    def __init__(self, mlflow: Any, run_id: str, stage: str, meta: dict[str, Any]) -> None:
        self.mlflow = mlflow
        self.run_id = run_id
        self.stage = stage
        self.meta = meta

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        self.mlflow.log_metrics(clean, step=step)

    def log_image(self, image: np.ndarray, name: str) -> None:
        """`image`: HxW or HxWxC, float in [0,1] or uint8."""
        self.mlflow.log_image(image, artifact_file=f"images/{name}")

    def log_figure(self, figure: Any, name: str) -> None:
        self.mlflow.log_figure(figure, f"figures/{name}")

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=folder)

    def log_dataset(self, name: str, digest: str, source: Path, context: str) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        ds = MetaDataset(LocalArtifactDatasetSource(str(source.resolve())), name=name, digest=digest)
        self.mlflow.log_input(ds, context=context)

    def log_torch_model(self, model: Any, name: str, input_example: np.ndarray) -> str:
        """Log a torch module as an MLflow model; returns its model URI."""
        info = self.mlflow.pytorch.log_model(
            model, name=name, input_example=input_example, serialization_format="pickle"
        )
        return str(info.model_uri)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def write_meta(self, folder: Path, extra: dict[str, Any] | None = None) -> None:
        """meta.json in an output folder: how downstream stages find this run and its inputs."""
        write_json(folder / lineage.META_FILE, {**self.meta, **(extra or {})})


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    sections: tuple[str, ...],
    deps: list[Path],
    root: Path | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage execution, tagged with everything needed to reproduce it.

    `deps` are the stage's input files/folders; their md5s (DVC's scheme) and the run ids in
    their meta.json become tags. The run ends FAILED if the body raises.
    """
    root = root or Path.cwd()
    mlflow = _mlflow()
    git = lineage.git_info(root)
    dep_md5 = {str(d): lineage.dvc_md5(root / d) for d in deps if (root / d).exists()}
    upstream = {
        meta["stage"]: meta["run_id"]
        for d in deps
        if (meta := lineage.read_meta(root / d)) and "run_id" in meta
    }
    seed = params.base.seed
    meta = {
        "stage": stage,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "params_hash": params.digest(*sections),
        "params": {s: getattr(params, s).model_dump() for s in ("base", *sections)},
        "deps": dep_md5,
        "upstream_runs": upstream,
        "seed": seed,
        "versions": lineage.versions(),
    }
    tags = {
        "dvc.stage": stage,
        "git.commit": git["commit"],
        "git.dirty": git["dirty"],
        "params.hash": meta["params_hash"],
        "seed": seed,
        **{f"dep.{k}": v for k, v in dep_md5.items()},
        **{f"upstream.{k}": v for k, v in upstream.items()},
        **{f"version.{k}": v for k, v in meta["versions"].items()},
    }
    start = time.perf_counter()
    with mlflow.start_run(run_name=stage, tags={k: str(v) for k, v in tags.items()}) as run:
        meta["run_id"] = run.info.run_id
        mlflow.log_params(flatten({s: getattr(params, s).model_dump() for s in ("base", *sections)}))
        handle = StageRun(mlflow, run.info.run_id, stage, meta)
        yield handle
        mlflow.log_metric("wall_seconds", time.perf_counter() - start)
