"""The tiny pipeline against a real `mlflow server` (README: Scaling out): a SQLite backend
store, then PostgreSQL where it is installed, artifacts proxied by the server into a folder.
One pipeline run per backend; the tests after it read, re-register, race and kill in file
order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.conftest import BIN, copy_repo, git, run
from tests.tiny import write_tiny_params

pytestmark = pytest.mark.slow
MODEL = "genpipe-generator"
# A lost server surfaces after MLflow's retries (about 4 min at its defaults); one retry here.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('backend') / 'mlflow.db'}"
        return
    if reason := servers.postgres_missing():
        pytest.skip(f"PostgreSQL backend store not tested: {reason}")
    with servers.postgres() as uri:
        yield uri


@pytest.fixture(scope="module")
def server(backend: str, tmp_path_factory) -> Iterator[servers.Service]:
    folder = tmp_path_factory.mktemp("server")
    service = servers.mlflow_server(backend, str(folder / "artifacts"), folder / "server.log")
    with service.running():
        yield service


@pytest.fixture(scope="module")
def pipeline(server: servers.Service, tmp_path_factory, prefect_api) -> tuple[Path, dict]:
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    write_tiny_params(repo)
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params")
    env = {"MLFLOW_TRACKING_URI": server.url}
    run(["genpipe", "data", "ensure"], repo, env)
    run(["python", "-m", "flows.pipeline"], repo, env)
    return repo, env


def client(server: servers.Service):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def aliases(server: servers.Service) -> dict[str, str]:
    found = client(server).get_registered_model(MODEL).aliases
    return {alias: str(version) for alias, version in found.items()}


def versions(server: servers.Service) -> dict[str, dict[str, str]]:
    """Every version of the generator with its tags."""
    found = client(server).search_model_versions(f"name = '{MODEL}'")
    return {str(v.version): dict(v.tags) for v in found}


def stage_runs(server: servers.Service) -> dict[str, list]:
    c = client(server)
    experiment = c.get_experiment_by_name("genpipe")
    runs = c.search_runs([experiment.experiment_id], max_results=1000)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("dvc.stage", "?"), []).append(r)
    return by_stage


def register(repo: Path, env: dict) -> subprocess.Popen[str]:
    """`genpipe stage register` in `repo` (in-process stage, no Prefect), started."""
    return subprocess.Popen(
        ["genpipe", "stage", "register"],
        cwd=repo,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_stage_ran_on_the_server_with_lineage(pipeline, server):
    repo, _ = pipeline
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    by_stage = stage_runs(server)
    commit = git(repo, "rev-parse", "HEAD").strip()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    run_ids = {r.info.run_id for runs in by_stage.values() for r in runs}
    for name in stages:
        assert [r.info.status for r in by_stage.get(name, [])] == ["FINISHED"], name
        tags = by_stage[name][0].data.tags
        assert tags["git.commit"] == commit and tags["git.dirty"] == "False", (name, tags)
        locked = {d["path"]: d["md5"] for d in lock[name]["deps"]}
        tagged = {k.removeprefix("dep."): v for k, v in tags.items() if k.startswith("dep.")}
        assert tagged and all(locked[p] == md5 for p, md5 in tagged.items()), (name, tagged)
        upstream = {k: v for k, v in tags.items() if k.startswith("upstream.")}
        assert name == "prepare" or upstream, name
        assert set(upstream.values()) <= run_ids, (name, upstream)
        assert by_stage[name][0].info.artifact_uri.startswith("mlflow-artifacts:/"), name
    # artifacts went through the server into its destination folder, not beside the repo
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()
    folder = Path(server.cmd[server.cmd.index("--artifacts-destination") + 1])
    assert len(list(folder.rglob("meta.json"))) >= len(stages)


def test_logged_models_load_back_through_the_server(pipeline, server):
    import mlflow
    import torch

    c = client(server)
    experiment = c.get_experiment_by_name("genpipe")
    models = {m.name: m for m in c.search_logged_models([experiment.experiment_id])}
    assert {"tokenizer", "reward", "evaluator", "generator"} <= set(models), sorted(models)
    mlflow.set_tracking_uri(server.url)
    try:
        tokenizer = mlflow.pytorch.load_model(f"models:/{models['tokenizer'].model_id}")
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    assert isinstance(tokenizer, torch.nn.Module)


def test_aliases_and_the_promotion_gate(pipeline, server):
    repo, env = pipeline
    assert aliases(server) == {"candidate": "1", "champion": "1"}
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert decision["promote"] and "first model" in decision["reason"]
    # the same model registered again is within the noise of itself: candidate only
    proc = register(repo, env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert not decision["promote"] and "noise margin" in decision["reason"], decision
    assert decision["champion_version"] == "1"
    assert aliases(server) == {"candidate": "2", "champion": "1"}
    assert versions(server)["2"]["state"] == "candidate"


def test_champion_loads_as_pyfunc_and_audits(pipeline, server):
    repo, env = pipeline
    code = (
        "import mlflow, pandas as pd\n"
        "m = mlflow.pyfunc.load_model('models:/genpipe-generator@champion')\n"
        "print(list(m.predict(pd.DataFrame({'label': [3, 7], 'seed': [0, 1]})).shape))\n"
    )
    shape = run([sys.executable, "-c", code], repo, env, timeout=300)
    assert shape.strip().splitlines()[-1] == "[2, 1, 8, 8]"
    # the lineage walk and its checks read every run and artifact through the server; the
    # re-run itself writes to a scratch store (tests/test_ops.py covers it)
    out = run(["genpipe", "audit", "--no-rerun"], repo, env, timeout=600)
    assert "**Verdict: reproduces**" in out, out
    assert "data/raw: recoverable | yes" in out
    audits = stage_runs(server)["?"]
    assert any(r.data.tags.get("audit.verdict") == "reproduces" for r in audits)


def test_two_racing_registers_move_champion_exactly_once(pipeline, server):
    repo, env = pipeline
    # a second checkout (its promotion file lock is its own), one per store parameter
    other = Path(tempfile.mkdtemp(prefix="racer-", dir=repo.parent))
    shutil.copytree(
        repo, other, symlinks=True, ignore=shutil.ignore_patterns("locks"), dirs_exist_ok=True
    )
    client(server).delete_registered_model_alias(MODEL, "champion")  # both will want it
    before = set(versions(server))
    procs = [register(here, env) for here in (repo, other)]
    outs = [p.communicate(timeout=900) for p in procs]
    new = sorted(set(versions(server)) - before, key=int)
    assert len(new) == 2, outs
    states = {v: versions(server)[v].get("state") for v in new}
    winners = [v for v, s in states.items() if s == "champion"]
    assert len(winners) == 1, (states, [e[-2000:] for _, e in outs])
    assert aliases(server)["champion"] == winners[0]
    (loser,) = set(new) - set(winners)
    # the loser either decided again against the new champion or stopped, aliasing nothing
    assert states[loser] in {"candidate", "failed"}, states
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0 or "ChampionMoved" in err, err[-3000:]


def test_a_server_killed_mid_stage_fails_clearly_and_a_rerun_completes(pipeline, server):
    repo, env = pipeline
    before, known = aliases(server), set(versions(server))
    proc = register(repo, {**env, **FAST_FAIL})
    try:
        deadline = time.monotonic() + 600
        while not set(versions(server)) - known:  # killed once the new version exists
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "register made no version in 600 s"
            time.sleep(0.2)
        server.stop(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.start()
    assert proc.returncode != 0
    assert f"MLflow tracking server {server.url}" in err, err[-3000:]
    (half,) = set(versions(server)) - known
    assert aliases(server) == before  # nothing moved
    assert versions(server)[half].get("state") in {None, "pending", "failed"}
    assert half not in aliases(server).values()
    proc = register(repo, env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    (done,) = set(versions(server)) - known - {half}
    assert aliases(server)["candidate"] == done
    killed = [r for r in stage_runs(server)["register"] if r.info.status == "KILLED"]
    assert len(killed) == 1 and "genpipe.stale" in killed[0].data.tags
