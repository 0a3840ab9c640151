"""The writing side of tracking: a stage's MLflow run, its lineage tags, pictures and models."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genpipe import lineage
from genpipe.config import Params
from genpipe.tracking import parent, store

FLOW_RUN_ENV = "GENPIPE_FLOW_RUN_ID"  # the Prefect flow run of this stage (flows/stage.py)
log = logging.getLogger(__name__)


class StageRun:
    """Handle a stage uses to record its run; created by `stage_run`."""

    def __init__(self, mlflow: Any, run_id: str, stage: str) -> None:
        self.mlflow = mlflow
        self.run_id = run_id
        self.stage = stage
        self._streamed: set[tuple[str, int]] = set()  # (prefix, step) sent by log_row

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {
            k: float(v) for k, v in store.flatten(metrics).items() if isinstance(v, int | float)
        }
        self.mlflow.log_metrics(clean, step=step)

    def log_row(self, row: dict[str, float], prefix: str = "train/") -> None:
        """One row of a curve ({"step": s, name: value, ...}) while training runs, stamped
        now. Queued (MLflow's async logging), so training never waits on the store; the
        queue is flushed when the run ends. Non-finite values (a batch without an update)
        are left out, as in `log_history`."""
        step = int(row["step"])
        values = {
            f"{prefix}{k}": float(v) for k, v in row.items() if k != "step" and math.isfinite(v)
        }
        self.mlflow.log_metrics(values, step=step, synchronous=False)
        self._streamed.add((prefix, step))

    def log_history(self, rows: list[dict[str, float]], prefix: str = "train/") -> None:
        """The rows of a curve `log_row` did not send (those a resumed run trained before it
        was interrupted), in one batched write."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{prefix}{k}", float(v), now, int(row["step"]))
            for row in rows
            if (prefix, int(row["step"])) not in self._streamed
            for k, v in row.items()
            if k != "step"
        ]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

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

        ds = MetaDataset(
            LocalArtifactDatasetSource(str(source.resolve())), name=name, digest=digest
        )
        self.mlflow.log_input(ds, context=context)

    def log_torch_model(self, model: Any, name: str, input_example: np.ndarray) -> str:
        """Log a torch module as an MLflow model (a record of the stage's weights, loadable
        with mlflow.pytorch.load_model); returns its model URI. Saved as a torch.export
        program ("pt2": a graph and tensors, no pickled code); a module torch.export cannot
        trace falls back to MLflow's pickle format, with a warning naming why. The servable
        model is the registered generator (serving.py)."""
        from mlflow.models import infer_signature

        common = {
            "name": name,
            "signature": infer_signature(input_example),  # batch dimension free
            "pip_requirements": store.model_requirements(),
        }
        try:
            info = self.mlflow.pytorch.log_model(
                model,
                input_example=input_example,  # what torch.export traces
                serialization_format="pt2",
                validate_serving_input=False,  # a record, not served: a tuple output is fine
                **common,
            )
        except Exception as exc:  # noqa: BLE001 - torch.export refuses in many types
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning(
                "model %s: torch.export cannot trace it (%s); logged as a pickle", name, reason
            )
            info = self.mlflow.pytorch.log_model(model, serialization_format="pickle", **common)
        return str(info.model_uri)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def find_producer(mlflow: Any, root: Path, dep: Path, md5: str) -> tuple[str, str] | None:
    """(stage, run id) of the finished run that wrote `dep` with these exact bytes: the
    sidecar when it still matches, else the newest run tagged with that output md5 (outputs
    restored from DVC's run cache have no sidecar). None when no run in this store made them."""
    record = lineage.read_sidecar(root, dep)
    if record.get("md5") == md5 and "run_id" in record:
        return str(record["stage"]), str(record["run_id"])
    runs = mlflow.search_runs(
        filter_string=f"tags.`out.{dep.as_posix()}` = {_quote(md5)} "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        return None
    return runs[0].data.tags.get("dvc.stage", "unknown"), runs[0].info.run_id


def close_stale(mlflow: Any, stage: str, root: Path) -> list[str]:
    """Mark KILLED, with a tag saying why, every run of `stage` from this project root still
    RUNNING: its process died without ending it (SIGKILL, power loss). Called under the
    stage's lock, so no live run of the stage in this checkout can be among them."""
    stale = mlflow.search_runs(
        filter_string=f"tags.`dvc.stage` = {_quote(stage)} "
        f"and tags.`genpipe.root` = {_quote(str(root))} and attributes.status = 'RUNNING'",
        output_format="list",
    )
    why = (
        f"still RUNNING when the next {stage} run started (pid {os.getpid()}): its "
        "process died without ending it; marked KILLED"
    )
    return store.mark_killed(mlflow, stale, why)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    keys: tuple[str, ...],
    deps: list[Path],
    root: Path | None = None,
    outs: list[Path] | None = None,
) -> Iterator[StageRun]:
    """An MLflow run for one stage execution, tagged with everything needed to reproduce it.

    `keys`: the params sections (or dotted keys) the stage reads, logged and hashed with
    `base`. `deps` are the stage's input files/folders; their md5s (DVC's scheme) and the
    runs that made them (`find_producer`) become tags. After the body, each out's md5 is a
    tag `out.<path>` and a sidecar (genpipe.lineage), and the md5 of every file of `outs` is
    logged as `lineage/outputs.json`: what an audit re-run must reproduce byte for byte.
    The run ends FAILED if the body raises; runs of this stage, and pipeline parents of
    this checkout, left RUNNING by a killed process are marked KILLED first (`close_stale`,
    `parent.close_stale`). It records system metrics, and nests
    under its pipeline's parent run when it is one stage of a pipeline run (tracking.parent).
    """
    root = (root or Path.cwd()).resolve()
    mlflow = store.mlflow()
    close_stale(mlflow, stage, root)
    parent.close_stale(mlflow, str(root))
    git = lineage.git_info(root)
    dep_md5 = {str(d): lineage.dvc_md5(root / d) for d in deps if (root / d).exists()}
    upstream = dict(
        found
        for d in deps
        if str(d) in dep_md5 and (found := find_producer(mlflow, root, d, dep_md5[str(d)]))
    )
    seed = params.base.seed
    meta = {
        "stage": stage,
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "params_hash": params.digest(*keys),
        "params": params.pick("base", *keys),
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
        "genpipe.root": root,
        "genpipe.pid": os.getpid(),
        **{f"dep.{k}": v for k, v in dep_md5.items()},
        **{f"upstream.{k}": v for k, v in upstream.items()},
        **{f"version.{k}": v for k, v in meta["versions"].items()},
    }
    if flow_run := os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = flow_run
    group = parent.current()
    parent_id = None
    if group is not None:
        tags.update({**group.tags, parent.KEY_TAG: group.key})
        shared = {"genpipe.root": str(root), "git.commit": git["commit"]}
        parent_id = parent.open_run(mlflow, group, shared)
    start = time.perf_counter()
    try:
        with mlflow.start_run(
            run_name=stage,
            tags={k: str(v) for k, v in tags.items()},
            parent_run_id=parent_id,
            log_system_metrics=store.system_metrics(),
        ) as run:
            meta["run_id"] = run.info.run_id
            mlflow.log_params(store.flatten(params.pick("base", *keys)))
            handle = StageRun(mlflow, run.info.run_id, stage)
            yield handle
            mlflow.log_metric("wall_seconds", time.perf_counter() - start)
            written = [o for o in outs or [] if (root / o).exists()]
            meta["outs"] = {o.as_posix(): lineage.dvc_md5(root / o) for o in written}
            mlflow.set_tags({f"out.{k}": v for k, v in meta["outs"].items()})
            mlflow.log_dict(lineage.output_digests(root, outs or []), "lineage/outputs.json")
            mlflow.log_dict(meta, "lineage/meta.json")
            for o in written:
                md5 = meta["outs"][o.as_posix()]
                lineage.write_sidecar(
                    root, o, {"stage": stage, "run_id": handle.run_id, "md5": md5}
                )
    except BaseException:
        if parent_id is not None:
            with contextlib.suppress(Exception):  # the stage's own error is the one to show
                parent.close_run(mlflow, parent_id, "FAILED")
        raise
    if parent_id is not None:
        parent.close_run(mlflow, parent_id, "FINISHED")


def log_report(stage: str, files: list[Path], tags: dict[str, Any]) -> str:
    """A small run holding report files (e.g. an audit), tagged to what it reports on."""
    mlflow = store.mlflow()
    with mlflow.start_run(run_name=stage, tags={k: str(v) for k, v in tags.items()}) as run:
        for f in files:
            mlflow.log_artifact(str(f), artifact_path=stage)
        return str(run.info.run_id)
