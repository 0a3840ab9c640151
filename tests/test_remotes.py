"""Sharing a pipeline's results as a team does (README: Working as a team, Scaling out): the
first clone runs the tiny pipeline, commits `dvc.lock` with what DVC does not cache (metrics,
plots, the register decision) and pushes data, outputs and the run cache to a DVC remote; a
colleague's clone pulls and has nothing to re-run. Once with a local remote, once with S3
(moto's server on a loopback port, as in DVC's own tests); the pipeline's MLflow server
keeps its artifacts in the same bucket. One pipeline run for the module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import copy_repo, git, run
from tests.tiny import write_tiny_params

pytestmark = pytest.mark.slow
BUCKET = "genpipe-test"
ENV = servers.S3_ENV  # credentials for moto; a local remote ignores them


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """moto's endpoint URL and its request log."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with servers.moto_s3(log, BUCKET) as endpoint:
        yield endpoint, log


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory) -> Iterator[servers.Service]:
    """`mlflow server` with its artifacts in the bucket, next to the DVC remote."""
    endpoint, _ = s3
    folder = tmp_path_factory.mktemp("mlflow")
    service = servers.mlflow_server(
        f"sqlite:///{folder / 'mlflow.db'}",
        f"s3://{BUCKET}/mlflow",
        folder / "server.log",
        {**ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint},
    )
    with service.running():
        yield service


@pytest.fixture(scope="module")
def first(tracking, tmp_path_factory, prefect_api) -> Path:
    """The clone that ran the pipeline and committed its results (the README's team flow)."""
    repo = copy_repo(tmp_path_factory.mktemp("first"))
    write_tiny_params(repo)
    commit(repo, "tiny params")
    env = {"MLFLOW_TRACKING_URI": tracking.url}
    run(["genpipe", "data", "ensure"], repo, env)
    run(["python", "-m", "flows.pipeline"], repo, env)
    commit(repo, "Run the pipeline: dvc.lock, metrics, plots, decision")
    assert not git(repo, "status", "--porcelain").strip()
    return repo


def share(first: Path, colleague: Path, remote: str, url: str, options: dict[str, str]) -> str:
    """The team flow against one DVC remote: `first` adds it (committed, so clones know it)
    and pushes with the run cache; `colleague` clones, pulls, and finds nothing to
    reproduce. Returns the colleague's `dvc repro` output."""
    run(["dvc", "remote", "add", "-d", remote, url], first, ENV)
    for key, value in options.items():
        run(["dvc", "remote", "modify", remote, key, value], first, ENV)
    commit(first, f"DVC remote {remote}")
    run(["dvc", "push", "--run-cache"], first, ENV)
    git(first.parent, "clone", "-q", str(first), str(colleague))
    run(["dvc", "pull"], colleague, ENV)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], colleague, ENV)
    for out in ("models/tokenizer", "data/codes", "models/finetune"):
        assert (colleague / out).is_dir() and any((colleague / out).iterdir()), out
    reproduced = run(["dvc", "repro"], colleague, ENV)
    assert "Data and pipelines are up to date" in reproduced
    assert "Running stage" not in reproduced, reproduced
    return reproduced


def test_a_colleague_pulls_from_a_local_remote_and_reruns_nothing(first, tmp_path):
    remote = tmp_path / "dvc-remote"
    share(first, tmp_path / "colleague", "shared", str(remote), {})
    runs = [p for p in (remote / "runs").rglob("*") if p.is_file()]
    assert runs, "dvc push --run-cache left no run-cache entries on the remote"


def test_a_colleague_pulls_from_s3_and_data_ensure_pulls_raw_data(first, s3, tmp_path):
    endpoint, log = s3
    share(first, tmp_path / "colleague", "s3", f"s3://{BUCKET}/dvc", {"endpointurl": endpoint})
    assert servers.s3_keys(endpoint, BUCKET, "dvc/files/md5/")
    assert servers.s3_keys(endpoint, BUCKET, "dvc/runs/"), "no run cache pushed to S3"
    third = tmp_path / "third"  # `make repro` in a fresh clone starts with `data ensure`
    git(first.parent, "clone", "-q", str(first), str(third))
    seen = len(log.read_text())
    out = run(["genpipe", "data", "ensure"], third, ENV)
    md5 = out.strip().split("(")[-1].rstrip(")")
    assert md5.endswith(".dir") and "matches data.dvc" in out, out
    # pulled, not exported from the bundled digits (which would give the same bytes)
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in log.read_text()[seen:]
    assert (third / "data/raw/manifest.json").is_file()


def test_champion_with_artifacts_in_s3_loads_as_pyfunc(first, tracking, s3):
    endpoint, _ = s3
    keys = servers.s3_keys(endpoint, BUCKET, "mlflow/")
    assert any(k.endswith("/MLmodel") for k in keys), keys[:20]
    code = (
        "import mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/genpipe-generator@champion')\n"
        "print(list(m.predict(pd.DataFrame({'label': [1, 4], 'seed': [0, 0]})).shape))\n"
    )
    env = {"MLFLOW_TRACKING_URI": tracking.url}
    shape = run([sys.executable, "-c", code], first, env, timeout=300)
    assert shape.strip().splitlines()[-1] == "[2, 1, 8, 8]"
