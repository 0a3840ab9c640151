"""Logging the registered generator (genpipe.serving, an MLflow pyfunc) and the promotion
gate."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from genpipe.tracking import store

MODEL_NAME = "genpipe-generator"
CANDIDATE, CHAMPION = "candidate", "champion"
MAIN_BRANCH = "main"  # champion moves only from a clean run on it (or from the flow)
PROMOTION_FLOW_ENV = "GENPIPE_PROMOTION_FLOW"  # set to 1 by flows.pipeline.retrain_and_promote
LEASE = f"{MODEL_NAME}.alias-lease"  # exists only while a register run moves aliases
LEASE_STALE_S = 60.0


GUARD = "class_consistency"


class ChampionMoved(RuntimeError):
    """`champion` changed between the decision and the alias step (a racer outside the lock)."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate: dict[str, float]
    champion: dict[str, float] | None


def interval(metrics: dict[str, float], key: str) -> tuple[float, float]:
    """The bootstrap interval evaluation gives `key`; an error naming the fix if it is absent."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        raise KeyError(
            f"metrics have no {key}_ci_low/{key}_ci_high: the gate needs evaluation's bootstrap "
            "intervals; re-run `dvc repro evaluate` (or pick a register.primary_metric with one)"
        )
    return float(low), float(high)


def _noise(candidate: dict[str, float], champion: dict[str, float], key: str) -> float:
    """Combined half-width of the two intervals: how far apart two scores of one model may be."""
    half = [(hi - lo) / 2 for lo, hi in (interval(candidate, key), interval(champion, key))]
    return math.hypot(*half)


def _span(metrics: dict[str, float], key: str) -> str:
    low, high = interval(metrics, key)
    return f"{metrics[key]:.4g} [{low:.4g}, {high:.4g}]"


def decide(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    primary: str,
    lower_is_better: bool,
    margin: float,
    guard: str = GUARD,
) -> Decision:
    """Promote the first model; a later one only if it beats the champion on `primary` by more
    than `margin` times the combined half-width of their intervals (a gain inside the noise
    of two scores of one model is no gain), and is not worse on `guard` by more than that."""
    if champion is None:
        interval(candidate, primary)
        return Decision(True, "no champion yet: the first model is promoted", candidate, None)
    c, h = candidate[primary], champion[primary]
    gain = h - c if lower_is_better else c - h
    need = margin * _noise(candidate, champion, primary)
    drop = champion[guard] - candidate[guard]
    allowed = margin * _noise(candidate, champion, guard)
    better, guard_ok = gain > need, drop <= allowed
    scores = f"{primary} {_span(candidate, primary)} vs champion's {_span(champion, primary)}"
    if not better:
        reason = f"{scores}: gain {gain:.4g} is not above the noise margin {need:.4g}"
    elif not guard_ok:
        reason = (
            f"{scores} beats it, but {guard} {_span(candidate, guard)} is below champion's "
            f"{_span(champion, guard)} by {drop:.4g}, more than the noise margin {allowed:.4g}"
        )
    else:
        reason = (
            f"{scores}: gain {gain:.4g} is above the noise margin {need:.4g}; {guard} "
            f"{_span(candidate, guard)} vs {_span(champion, guard)} is within {allowed:.4g}"
        )
    return Decision(better and guard_ok, reason, candidate, champion)


def log_generator(tokenizer: Path, prior: Path, image_shape: tuple[int, ...]) -> str:
    """Log the generator in the active run as a models-from-code pyfunc (genpipe/serving.py,
    nothing pickled) and register it, tagged `state=pending` until the alias step marks it;
    returns the new version. `image_shape`: (C, H, W) of one generated image."""
    import genpipe
    from genpipe import serving

    info = mlflow.pyfunc.log_model(
        name="generator",
        python_model=serving.__file__,
        artifacts={"tokenizer": str(tokenizer), "prior": str(prior)},
        code_paths=[str(Path(genpipe.__file__).parent)],
        signature=serving.signature(image_shape),
        input_example=pd.DataFrame({"label": [0], "seed": [0]}),  # the request serving shows
        pip_requirements=store.model_requirements(),
        registered_model_name=MODEL_NAME,
    )
    version = str(info.registered_model_version)
    store.client().set_model_version_tag(MODEL_NAME, version, "state", "pending")
    return version


def champion_version() -> str | None:
    """The version `champion` points at; None only if the registered model does not exist
    (RESOURCE_DOES_NOT_EXIST) or has no such alias. Any other error (a locked store, a
    timeout) propagates: promoting past an unread champion would replace it unchecked.
    The alias is read from the model's alias map: a missing alias has no error code of its
    own (the SQL store calls it INVALID_PARAMETER_VALUE, like a malformed request)."""
    from mlflow.exceptions import MlflowException

    try:
        model = store.client().get_registered_model(MODEL_NAME)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(CHAMPION)
    return None if version is None else str(version)


def champion() -> tuple[str, Any] | None:
    """The current champion's version and its generator, loaded as serving loads it."""
    version = champion_version()
    if version is None:
        return None
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    return version, model.unwrap_python_model().generator


def lock_path() -> Path:
    """Beside the SQLite store when there is one (every racer on it sees the same file), else
    in the project root: a server store is only serialized per machine, the alias check
    (`move_aliases`) covers the rest."""
    uri = store.tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///") + ".promote.lock")
    return store.project_root() / ".genpipe-promote.lock"


@contextlib.contextmanager
def promotion_lock(timeout: float = 600.0) -> Iterator[None]:
    """Held from reading the champion to moving the aliases, so two `register` runs decide
    one after the other, each against the champion the other left."""
    from filelock import FileLock, Timeout

    path = lock_path()
    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout as e:
        raise TimeoutError(
            f"another register run held {path} for {timeout:.0f} s; if none is running, "
            "delete the file and re-run"
        ) from e


def mark(version: str, tags: dict[str, Any]) -> None:
    client = store.client()
    for k, v in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, k, str(v))


@contextlib.contextmanager
def alias_lease(timeout: float = 120.0, stale_after: float = LEASE_STALE_S) -> Iterator[None]:
    """Held around the compare-and-set of `move_aliases`, across machines: creating a
    registered model is the one atomic step MLflow's API has (a name exists once in every
    store), so only one racer holds `LEASE` at a time. A lease older than `stale_after`
    (its holder died within the few requests it is held for) is deleted and taken."""
    from mlflow.exceptions import MlflowException

    client = store.client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                LEASE, description=f"held by pid {os.getpid()} on {socket.gethostname()}"
            )
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(MlflowException):  # gone meanwhile: try again
            held = client.get_registered_model(LEASE)
            if time.time() - held.creation_timestamp / 1000 > stale_after:
                client.delete_registered_model(LEASE)
                continue
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"registered model {LEASE} (the alias lease of another register run) was "
                f"held for {timeout:.0f} s; if no register is running, delete it and re-run"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(LEASE)


def move_aliases(version: str, promote: bool, expected_champion: str | None) -> None:
    """The last step of `register`: alias `candidate`, and `champion` if promoted, after
    checking `champion` still points where the decision read it (compare-and-set under
    `alias_lease`; raises ChampionMoved otherwise, moving nothing)."""
    with alias_lease():
        now = champion_version()
        if promote and now != expected_champion:
            raise ChampionMoved(
                f"champion moved from version {expected_champion} to {now} after this run "
                "decided; nothing was aliased: re-run register to decide against the new "
                "champion"
            )
        client = store.client()
        client.set_registered_model_alias(MODEL_NAME, CANDIDATE, version)
        if promote:
            client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    mark(version, {"state": "champion" if promote else "candidate"})
