"""Shared fixtures: an isolated MLflow store, a throwaway copy of the repo, a Prefect server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# `python -c STAGE_COMMAND ARGS` is `python -m flows.stage ARGS`, then prints its exit code and
# whether the command itself imported torch (it does not when a warm process ran the stage).
STAGE_COMMAND = (
    "import runpy, sys\n"
    "sys.argv = ['flows.stage', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('flows.stage', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    print('exit', e.code, 'torch' in sys.modules)\n"
)
# The warm process a test's `dvc repro` starts (flows.warm_shared) serves only that test's
# checkout: let it go soon after the test's last stage, not a minute later.
os.environ.setdefault("GENPIPE_WARM_IDLE_S", "15")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Test-sized tensors: extra intra-op threads only add overhead (and spin on a busy box)."""
    from genpipe.runtime import cpu_threads

    with cpu_threads(torch.device("cpu")):
        yield


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite store for the session (creating one costs seconds of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect server for every pipeline test, as the README recommends for speed."""
    sys.path.insert(0, str(REPO))
    from genpipe.prefect_server import local_server

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    os.environ.pop("PREFECT_API_URL", None)  # a server of our own, never one a test left set
    with local_server() as url:
        yield url


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def copy_repo(dest: Path) -> Path:
    """The committed and staged project files (no outputs, no .venv) in a new git repo."""
    files = git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if (
            not src.is_file()
            or rel.startswith(("metrics/", "plots/", "reports/"))
            or rel == "dvc.lock"
        ):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    git(dest, "init", "-q", "-b", "main")  # champion moves only from main (registry.py)
    git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git(dest, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")
    return dest


def run(
    cmd: list[str], cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 900
) -> str:
    """Run a project command; on failure show its output in the test report.
    `env` entries set to None are removed (e.g. to use the copy's own MLflow store)."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
