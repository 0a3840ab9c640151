"""Where runs live: the MLflow tracking URI, the experiment and a configured client.

Default store: a SQLite file at the project root (absolute URI, so `dvc exp run --temp`
in .dvc/tmp/exps still finds it) with artifacts beside it in `mlartifacts/`.
`MLFLOW_TRACKING_URI` points everything at a server instead.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genpipe import locks

EXPERIMENT = os.environ.get("GENPIPE_EXPERIMENT", "genpipe")
STALE_TAG = "genpipe.stale"  # why a run left RUNNING by a killed process was marked KILLED
REACH_TIMEOUT_S = 3.0  # one bounded check at a stage's start; retries belong mid-run only
_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/\s@]+@")
MODEL_PACKAGES = ("torch", "numpy", "pandas")  # what loading a model imports


def model_requirements() -> list[str]:
    """Exact pins of the packages a logged genpipe model needs. Given explicitly, MLflow skips
    inferring them, which loads the model again in a subprocess (seconds per logged model)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in MODEL_PACKAGES]


def system_metrics() -> bool:
    """Whether stage runs record CPU, memory, disk and network (and GPU, with pynvml) every
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` seconds (default 10): on unless
    `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING` says false."""
    return os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("1", "true")


def project_root(start: Path | None = None) -> Path:
    """The main project folder, also from inside a `dvc exp run --temp` copy."""
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts and "exps" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return here


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(root) / 'mlflow.db'}"


def redact(text: str) -> str:
    """`http://user:pass@host` -> `http://***@host`, anywhere in `text`: URIs are shown in
    logs, errors and Prefect artifacts, credentials never."""
    return _CREDENTIALS.sub(r"\1***@", text)


def redact_exception(exc: BaseException) -> BaseException:
    """`exc`, and every exception it chains, with credentials removed from their messages in
    place (types kept: retries classify by type), so an orchestrator that logs or stores the
    error (Prefect's task and flow failure logs, its run states) shows the redacted URI."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.args = tuple(redact(a) if isinstance(a, str) else a for a in current.args)
        if isinstance(message := getattr(current, "message", None), str):
            current.message = redact(message)  # type: ignore[attr-defined] # MlflowException's copy
        current = current.__cause__ or current.__context__
    return exc


def redact_tracebacks() -> None:
    """Uncaught errors print redacted: MLflow's own messages carry the full tracking URI."""

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))

    sys.excepthook = hook


class TrackingUnreachable(ConnectionError):
    """The tracking server did not answer at a stage's start: a configuration problem until
    shown otherwise, so the stage stops at once instead of retrying for minutes."""

    transient = False


def check_reachable(uri: str | None = None, timeout: float = REACH_TIMEOUT_S) -> None:
    """One TCP connect to an http(s) tracking server, bounded by `timeout`; a file store
    needs none."""
    uri = uri or tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} cannot be reached "
            f"({exc.strerror or exc}); start it, or fix or unset MLFLOW_TRACKING_URI "
            "(unset: the local mlflow.db)"
        ) from None


class TrackingLost(ConnectionError):
    """The tracking server stopped answering while a stage ran (after MLflow's own retries,
    `MLFLOW_HTTP_REQUEST_MAX_RETRIES`): transient, so a flow retries the stage."""

    transient = True


_LOST = ("Connection refused", "Max retries exceeded", "Connection aborted", "RemoteDisconnected")


def lost_server(exc: BaseException, stage: str) -> TrackingLost | None:
    """A TrackingLost naming the (redacted) server URI when `exc` is a lost connection to an
    http(s) tracking server, else None. MLflow's own message names only the failed endpoint."""
    uri = tracking_uri()
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    text = f"{type(exc).__name__}: {exc}"
    cause = next((s for s in _LOST if s in text), None)
    if cause is None:
        return None
    return TrackingLost(
        f"MLflow tracking server {redact(uri)} stopped answering during stage {stage} "
        f"({cause}); start it again and re-run the stage: aliases move only at the end of "
        "`register`, so a stage cut short promoted nothing"
    )


def init_lock(uri: str) -> Path:
    """Beside a SQLite store (two stages creating it at once raced on its tables), else in
    the project's own untracked folder."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".init.lock")
    return project_root() / ".genpipe" / "store-init.lock"


def mlflow() -> Any:
    """The MLflow module configured for this project (imported lazily: it costs ~2 s).
    Creating the store and the experiment is serialised by a file lock."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # notes a user cannot act on: system metrics start/stop, checks of a model's example
    for name in ("mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars of local copies
    import mlflow as mlflow_module

    uri = tracking_uri()
    check_reachable(uri)
    mlflow_module.set_tracking_uri(uri)
    with locks.waiting(init_lock(uri)):
        if mlflow_module.get_experiment_by_name(EXPERIMENT) is None:
            artifacts = None
            if uri.startswith("sqlite:"):
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


def mark_killed(mlflow: Any, runs: list[Any], why: str) -> list[str]:
    """End runs a killed process left RUNNING: status KILLED, and STALE_TAG saying why."""
    client = mlflow.MlflowClient()
    for run in runs:
        client.set_tag(run.info.run_id, STALE_TAG, why)
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]
