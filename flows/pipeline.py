"""Prefect flows over the DVC DAG.

`pipeline`: each dvc.yaml stage is a task that runs `dvc repro --single-item <stage>`; DVC
decides what is stale and caches outputs, Prefect shows each stage's state and time,
retries transient failures and keeps the history. `make repro` runs it.

`retrain_and_promote`: optional data update (`dvc pull` / `dvc update`), the pipeline, then
the registry decision, with a markdown summary and the sample grid as Prefect artifacts.
This is the flow the nightly deployment schedules (flows/deploy.py, prefect.yaml).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import yaml

from flows.stage import PIPELINE_TASK_ENV, is_transient, retry_transient
from flows.warm import WARM_ENV, usable
from genpipe import lineage
from genpipe.cli import HelpFormatter
from genpipe.prefect_server import local_server
from genpipe.tracking import parent
from genpipe.tracking.store import redact

LOG = logging.getLogger("genpipe.pipeline")
DECISION = Path("reports/register/decision.json")
PROMOTION_FLOW_ENV = (
    "GENPIPE_PROMOTION_FLOW"  # genpipe.registry reads it; importing that costs ~2 s
)
EVALUATION = Path("metrics/evaluate.json")
SAMPLES = Path("plots/evaluate/samples_finetuned.png")
RETRY_DELAYS = [5, 20, 60]  # seconds between tries of a transient failure
RAW, DATA_DVC = Path("data/raw"), Path("data.dvc")
# A nightly run that hangs must not hold the deployment's only slot forever.
TIMEOUT_S = 6 * 3600


class DataChanged(RuntimeError):
    """data/raw differs from data.dvc: `dvc repro` would silently version the new bytes."""

    transient = False


def check_data(root: Path = Path(".")) -> str:
    """Refuse, naming the difference, when data/raw is not what data.dvc records."""
    expected = yaml.safe_load((root / DATA_DVC).read_text())["outs"][0]["md5"]
    raw = root / RAW
    if raw.is_dir() and lineage.dvc_md5(raw) == expected:
        return expected
    diff = lineage.dir_difference(raw, expected, root / ".dvc" / "cache")
    raise DataChanged(
        f"{diff}: run `dvc checkout data.dvc` to restore the versioned data, or "
        "`dvc add data/raw` and commit data.dvc to version the new data, then run again"
    )


class StageFailed(RuntimeError):
    """A stage exited non-zero; `transient` says whether another try may succeed."""

    def __init__(self, stage: str, output: str) -> None:
        super().__init__(f"stage {stage} failed:\n{redact(output)}")
        self.transient = is_transient(RuntimeError(output))


def _outs(stage: dict[str, Any]) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []) or []:
            paths.append(next(iter(item)) if isinstance(item, dict) else item)
    return paths


def stage_order(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages of dvc.yaml in dependency order (a stage after every stage whose out it reads)."""
    stages: dict[str, Any] = yaml.safe_load(dvc_yaml.read_text())["stages"]
    produced = {out: name for name, st in stages.items() for out in _outs(st)}
    graph = {
        name: {
            producer
            for dep in st.get("deps", []) or []
            for out, producer in produced.items()
            if producer != name and (dep == out or dep.startswith(out.rstrip("/") + "/"))
        }
        for name, st in stages.items()
    }
    return list(TopologicalSorter(graph).static_order())


def _line_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run's logger inside a flow or task (the UI shows its lines), else ours."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return LOG


def stream(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, logging each line of its output (stdout and stderr) at INFO as it arrives.

    Children write unbuffered, so a stage's prints arrive when printed, not at its end; a
    carriage return ends a line too, so a progress bar's redraws arrive as lines. Returns
    the exit code and the non-blank lines."""
    log = _line_logger()
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )  # text mode reads \r, \n and \r\n as line ends
    assert proc.stdout is not None
    lines = []
    with proc.stdout:
        for raw in proc.stdout:
            if line := raw.rstrip():
                lines.append(line)
                log.info(line)
    return proc.wait(), lines


def run_dvc(*args: str) -> str:
    """`dvc ARGS`, streamed; its stages run as this task (PIPELINE_TASK_ENV), not as flows."""
    code, lines = stream(["dvc", *args], {**os.environ, PIPELINE_TASK_ENV: " ".join(args)})
    out = "\n".join(lines)
    if code != 0:
        raise StageFailed(" ".join(args), out[-4000:])
    return out


@contextlib.contextmanager
def warm_stages(ready_s: float = 120.0) -> Iterator[Callable[[], None]]:
    """The stage commands of the `dvc repro` runs started inside run as children of one
    warm process (flows.warm), which imported torch and MLflow once. It starts on entry;
    stage commands use it once the `ready()` this yields has seen it listen, so the caller
    can start other things while it imports (`main`: the Prefect server). If it is not ready
    within `ready_s` (or dies), each command runs by itself, as it would without it."""
    if os.environ.get(WARM_ENV) or not usable():
        yield lambda: None
        return
    folder = tempfile.mkdtemp(prefix="genpipe-warm-")
    path = os.path.join(folder, "socket")
    # its own session: a Ctrl-C reaches a stage once, through the stage command (flows.warm)
    proc = subprocess.Popen([sys.executable, "-m", "flows.warm", path], start_new_session=True)

    def ready() -> None:
        deadline = time.monotonic() + ready_s
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.environ[WARM_ENV] = path

    try:
        yield ready
    finally:
        os.environ.pop(WARM_ENV, None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def repro_stage(name: str) -> dict[str, Any]:
    """Run one stage through DVC; report whether it ran, was up to date or came from cache."""
    start = time.perf_counter()
    out = run_dvc("repro", "--single-item", name)
    if "didn't change, skipping" in out:
        outcome = "up to date"
    elif "is cached - skipping run" in out:
        outcome = "restored from run cache"
    else:
        outcome = "ran"
    return {"stage": name, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1)}


def summary_markdown(
    results: list[dict[str, Any]],
    decision: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    tracking_uri: str,
) -> str:
    lines = ["# genpipe retrain-and-promote", "", "| stage | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['outcome']} | {r['seconds']} |" for r in results]
    if evaluation:
        keys = [
            "fid",
            "fid_floor",
            "fid_ratio",
            "precision",
            "recall",
            "class_consistency",
            "diversity",
        ]
        lines += ["", "| prior | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for prior in ("base", "finetuned"):
            if prior in evaluation:
                row = evaluation[prior]
                lines.append(
                    f"| {prior} | "
                    + " | ".join(f"{row.get(k, float('nan')):.4g}" for k in keys)
                    + " |"
                )
    if decision:
        verdict = "promoted to **champion**" if decision["promote"] else "kept as **candidate**"
        lines += ["", f"Version {decision['version']} {verdict}: {decision['reason']}."]
    shown = redact(tracking_uri)
    lines += ["", f"MLflow: `{shown}` (runs of experiment `genpipe`; `make ui` to browse)."]
    return "\n".join(lines)


@contextlib.contextmanager
def mlflow_parent() -> Iterator[None]:
    """The stage runs this flow starts (each in a `dvc repro` process) nest under one MLflow
    parent run keyed and tagged by this flow run; inside another flow, the outer one's."""
    import psutil
    from prefect.runtime import flow_run

    if os.environ.get(parent.PIPELINE_ENV):
        yield
        return
    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.flow_name": str(flow_run.flow_name),
        parent.OWNER_TAG: parent.owner(psutil.Process()),  # its parent is stale once it is gone
    }
    name = f"{flow_run.flow_name} {flow_run.name}"
    os.environ[parent.PIPELINE_ENV] = parent.describe(f"prefect:{flow_run.id}", name, tags)
    try:
        yield
    finally:
        os.environ.pop(parent.PIPELINE_ENV, None)


def build_flows() -> tuple[Any, Any]:
    from prefect import flow, task
    from prefect.artifacts import create_image_artifact, create_markdown_artifact

    retry = {
        "retries": len(RETRY_DELAYS),
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": retry_transient,
    }
    stage_task = task(repro_stage, name="dvc-repro-stage", **retry)
    data_task = task(lambda *args: run_dvc(*args), name="dvc-data-update", **retry)
    check_task = task(check_data, name="check-data")

    @flow(name="pipeline")
    def pipeline() -> list[dict[str, Any]]:
        with mlflow_parent(), warm_stages() as warm_ready:
            warm_ready()
            return [stage_task.with_options(name=name)(name) for name in stage_order()]

    @flow(name="retrain_and_promote", timeout_seconds=TIMEOUT_S)
    def retrain_and_promote(pull: bool = False, update_imports: bool = False) -> dict[str, Any]:
        from genpipe.tracking.store import tracking_uri

        if pull:
            # what the remote holds (new data, outputs pushed by others); outputs it lacks
            # are not an error: the stages below build them
            data_task.with_options(name="dvc-pull")("pull", "--allow-missing")
        if update_imports:
            data_task.with_options(name="dvc-update")("update", "-R", ".")
        check_task()
        # the one place besides a clean main workspace whose register may move `champion`
        os.environ[PROMOTION_FLOW_ENV] = "1"
        try:
            with mlflow_parent():
                results = pipeline()
        finally:
            os.environ.pop(PROMOTION_FLOW_ENV, None)
        decision = json.loads(DECISION.read_text()) if DECISION.is_file() else None
        evaluation = json.loads(EVALUATION.read_text()) if EVALUATION.is_file() else None
        create_markdown_artifact(
            summary_markdown(results, decision, evaluation, tracking_uri()),
            key="genpipe-summary",
            description="stages, evaluation and promotion decision",
        )
        if SAMPLES.is_file():
            data = base64.b64encode(SAMPLES.read_bytes()).decode()
            create_image_artifact(
                f"data:image/png;base64,{data}",
                key="genpipe-samples",
                description="fine-tuned prior, one class per row",
            )
        return {"stages": results, "decision": decision}

    return pipeline, retrain_and_promote


# Module-level flow objects, so `prefect deploy` can name an entrypoint.
pipeline_flow, retrain_and_promote_flow = build_flows()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description="Run the DVC DAG as one Prefect flow, one task per stage (`make repro`), "
        "on PREFECT_API_URL or a local server started for the run.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "flow",
        nargs="?",
        default="pipeline",
        choices=["pipeline", "retrain_and_promote"],
        help="pipeline: every stale stage; retrain_and_promote: the nightly flow (checks "
        "data/raw, runs the pipeline, may move `champion`, leaves a summary artifact)",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    which = parser().parse_args(argv).flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    flow = pipeline_flow if which == "pipeline" else retrain_and_promote_flow
    # prefect is imported (and its settings read) already: point this process at the server.
    # The warm process imports torch and MLflow while the server starts, not after.
    with (
        warm_stages() as warm_ready,
        local_server() as api_url,
        temporary_settings({PREFECT_API_URL: api_url}),
    ):
        warm_ready()
        try:
            result = flow()
        finally:
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)  # the run's last log lines, before the server goes
    rows = result if isinstance(result, list) else result["stages"]
    for r in rows:
        print(f"{r['stage']:<12} {r['outcome']:<24} {r['seconds']:>7.1f} s")


if __name__ == "__main__":
    main()
