"""One pipeline run, one unit in MLflow: the parent run that a pipeline's stage runs nest under.

Stages run as separate processes, so the parent is found (or made) by a key every stage of
one pipeline run shares:
- a Prefect pipeline flow: `GENPIPE_PIPELINE`, set by flows/pipeline.py for the `dvc repro`
  processes it starts (key `prefect:<flow run id>`, tagged with the flow run's id and name);
- `dvc repro` or `dvc exp run` on their own: the DVC process that runs the stage commands
  (DVC sets `DVC_STAGE` for them), tagged with the experiment's name when DVC gives one;
- a stage run by itself (`genpipe stage`, a test): no parent.

Every run of the group, parent and stages, carries the tag `genpipe.pipeline` = key, so
`tags."genpipe.pipeline" = '<key>'` (or `tags."dvc.exp_name" = 'name'`) finds all of it.
The parent is RUNNING while one of its stages runs and ends as its last stage did. A stage
killed outright (SIGKILL) cannot end it: the next stage run in the checkout marks such a
parent KILLED, tagged `genpipe.stale`, once the process that owned its group (tag
`genpipe.owner`: the DVC process, or the pipeline flow's) is gone (`close_stale`).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from genpipe import locks
from genpipe.tracking import store

PIPELINE_ENV = "GENPIPE_PIPELINE"  # JSON {"key", "name", "tags"}: a flow's pipeline run
KEY_TAG = "genpipe.pipeline"
PARENT_TAG = "genpipe.parent"  # "true" on the parent only: its stages share KEY_TAG
OWNER_TAG = "genpipe.owner"  # host:pid:start time of the process the group lives in
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}  # what DVC runs a stage command in


@dataclass(frozen=True)
class Pipeline:
    key: str
    name: str
    tags: dict[str, str]


def describe(key: str, name: str, tags: dict[str, str]) -> str:
    """The `GENPIPE_PIPELINE` value that makes the stages a flow starts one group."""
    return json.dumps({"key": key, "name": name, "tags": tags})


def owner(proc: Any) -> str:
    """The OWNER_TAG of a psutil process: the start time tells a reused pid apart."""
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"


def _alive(owner_tag: str) -> bool:
    """Whether the owner is still running; True for another host's (it cannot be told)."""
    import psutil

    host, pid, started = owner_tag.rsplit(":", 2)
    if host != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(pid))
        return proc.status() != psutil.STATUS_ZOMBIE and f"{proc.create_time():.2f}" == started
    except psutil.NoSuchProcess:  # a zombie too
        return False
    except psutil.Error:  # not ours to look at: it exists
        return True


def _dvc_process() -> Any | None:
    """The DVC process running this stage command: the first ancestor that is not a shell."""
    import psutil

    try:
        proc = psutil.Process(os.getppid())
        while proc is not None and proc.name() in SHELLS:
            proc = proc.parent()
    except psutil.Error:
        return None
    return proc


def current() -> Pipeline | None:
    """The pipeline run this process's stage belongs to; None for a stage run on its own."""
    tags = {}
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    if baseline := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_baseline_rev"] = baseline
    if given := os.environ.get(PIPELINE_ENV):
        found = json.loads(given)
        return Pipeline(found["key"], found["name"], {**tags, **found["tags"]})
    if os.environ.get("DVC_STAGE") and (dvc := _dvc_process()) is not None:
        key = f"dvc:{owner(dvc)}"
        return Pipeline(key, exp or "dvc repro", {**tags, OWNER_TAG: owner(dvc)})
    return None


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def open_run(mlflow: Any, pipeline: Pipeline, tags: dict[str, str]) -> str:
    """The id of the group's parent run, made by the group's first stage and RUNNING again
    for each later one. `tags` (root, commit) are set only when it is made. Serialised by
    the store's lock: two stages of one group never make two parents."""
    client = mlflow.MlflowClient()
    with locks.waiting(store.init_lock(store.tracking_uri())):
        runs = mlflow.search_runs(
            filter_string=f"tags.`{KEY_TAG}` = {_quote(pipeline.key)} "
            f"and tags.`{PARENT_TAG}` = 'true'",
            max_results=1,
            output_format="list",
        )
        if runs:
            client.update_run(runs[0].info.run_id, status="RUNNING")
            return str(runs[0].info.run_id)
        experiment = mlflow.get_experiment_by_name(store.EXPERIMENT).experiment_id
        all_tags = {**tags, **pipeline.tags, KEY_TAG: pipeline.key, PARENT_TAG: "true"}
        run = client.create_run(experiment, tags=all_tags, run_name=pipeline.name)
        return str(run.info.run_id)


def close_run(mlflow: Any, run_id: str, status: str) -> None:
    """End the parent as the stage that just ended (a later stage opens it again)."""
    mlflow.MlflowClient().set_terminated(run_id, status=status)


def close_stale(mlflow: Any, root: str) -> list[str]:
    """Mark KILLED, tagged `genpipe.stale` with why, every parent run of this checkout left
    RUNNING by a group whose owner process is gone: a stage of it was killed outright and
    no later stage of the group will end it. A live owner's parent is left alone (its next
    stage ends it); so is one made before parents had owners."""
    stale = [
        run
        for run in mlflow.search_runs(
            filter_string=f"tags.`{PARENT_TAG}` = 'true' and tags.`genpipe.root` = "
            f"{_quote(root)} and attributes.status = 'RUNNING'",
            output_format="list",
        )
        if (found := run.data.tags.get(OWNER_TAG)) and not _alive(found)
    ]
    for run in stale:
        why = (
            f"still RUNNING when a later stage run started (pid {os.getpid()}) and its owner "
            f"{run.data.tags[OWNER_TAG]} was gone: a stage was killed; marked KILLED"
        )
        store.mark_killed(mlflow, [run], why)
    return [run.info.run_id for run in stale]
