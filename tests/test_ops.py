"""Operations on a tiny but real pipeline in a fresh git copy: registry and promotion,
serving, audits, and the Prefect flows (artifacts, retries, failures, a served deployment).
Tests that change the copy (new commits, tampered data) come last, in file order."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from genpipe.registry import decide
from tests.conftest import copy_repo, git, run
from tests.tiny import edit_params, write_tiny_params

pytestmark = pytest.mark.slow
ENV = {"MLFLOW_TRACKING_URI": None}


def _harness():
    """A throwaway Prefect server; its start-up gets 180 s, not Prefect's 30, because on a
    loaded 2-core CI machine it has taken longer than 30 s to answer /health."""
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=180)


def commit(repo: Path, message: str) -> None:
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, prefect_api):
    repo = copy_repo(tmp_path_factory.mktemp("tiny"))
    write_tiny_params(repo)
    commit(repo, "tiny params")
    run(["genpipe", "data", "ensure"], repo, ENV)
    run(["python", "-m", "flows.pipeline"], repo, ENV)
    return repo


def client(repo: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def aliases(repo: Path) -> dict[str, str]:
    found = client(repo).get_registered_model("genpipe-generator").aliases
    return {alias: str(version) for alias, version in found.items()}


def pyfunc_env(repo: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}


def test_first_model_is_champion_with_decision_recorded(repo):
    assert aliases(repo) == {"candidate": "1", "champion": "1"}
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert decision["promote"] and "first model" in decision["reason"]
    version = client(repo).get_model_version("genpipe-generator", "1")
    assert version.tags["promoted"] == "True"


def test_champion_loads_in_a_fresh_process(repo):
    code = (
        "import mlflow, pandas as pd, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/genpipe-generator@champion')\n"
        "a = m.predict(pd.DataFrame({'label': [3, 7], 'seed': [0, 1]}))\n"
        "b = m.predict(pd.DataFrame({'label': [3], 'seed': [0]}))\n"
        "import json\n"
        "print(json.dumps({'dtype': str(a.dtype), 'shape': list(a.shape), 'min': float(a.min()),\n"
        "                  'max': float(a.max()),\n"
        "                  'same_seed_same_image': bool(np.array_equal(a[:1], b))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env=pyfunc_env(repo),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "float32" and result["shape"] == [2, 1, 8, 8]
    assert 0.0 <= result["min"] <= result["max"] <= 1.0
    assert result["same_seed_same_image"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_http(repo):
    port = _free_port()
    server = subprocess.Popen(
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/genpipe-generator@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=repo,
        env={**pyfunc_env(repo), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        body = json.dumps(
            {"dataframe_split": {"columns": ["label", "seed"], "data": [[5, 0], [2, 1]]}}
        )
        deadline = time.monotonic() + 300  # mlflow serve imports torch and loads the model
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    body.encode(),
                    {"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "server did not answer in 300 s"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    images = answer["predictions"]
    assert len(images) == 2 and len(images[0]) == 1 and len(images[0][0]) == 8
    flat = [v for img in images for row in img[0] for v in row]
    assert all(0.0 <= v <= 1.0 for v in flat)


def _scores(fid_ratio: float, consistency: float, half: float = 0.1) -> dict[str, float]:
    scores = {"fid_ratio": fid_ratio, "class_consistency": consistency}
    for key, value in list(scores.items()):
        width = half if key == "fid_ratio" else half / 10
        scores[f"{key}_ci_low"], scores[f"{key}_ci_high"] = value - width, value + width
    return scores


def test_promotion_gate_rules():
    champ = _scores(2.0, 0.9)
    assert decide(_scores(1.5, 0.9), champ, "fid_ratio", True, margin=1.0).promote
    worse = decide(_scores(2.5, 0.95), champ, "fid_ratio", True, margin=1.0)
    assert not worse.promote and "not above the noise margin" in worse.reason
    guard = decide(_scores(1.0, 0.8), champ, "fid_ratio", True, margin=1.0)
    assert not guard.promote and "class_consistency" in guard.reason


def test_audit_passes_on_the_clean_run(repo):
    out = run(["genpipe", "audit", "--model", "genpipe-generator@champion"], repo, ENV, timeout=900)
    assert "Verdict: reproduces" in out
    report = json.loads((repo / "reports/audit/genpipe-generator-v1.json").read_text())
    checked = [i["what"] for i in report["items"]]
    assert any("models/tokenizer/model.pt" in w for w in checked)
    assert any(w == "data/raw: recoverable" for w in checked)


def _bin_path(monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def test_retrain_flow_leaves_summary_and_grid_artifacts(repo, monkeypatch):
    from flows import pipeline

    monkeypatch.chdir(repo)
    _bin_path(monkeypatch)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with _harness():
        from prefect.client.orchestration import get_client

        state = pipeline.retrain_and_promote_flow(return_state=True)
        assert state.is_completed()
        result = state.result()
        assert [r["outcome"] for r in result["stages"]] == ["up to date"] * len(result["stages"])
        # the raw filter call: prefect 3.8.8's client sends nulls this server version rejects
        body = {"limit": 50, "offset": 0, "sort": "UPDATED_DESC"}
        with get_client(sync_client=True) as client:
            listed = client._client.post("/artifacts/filter", json=body).json()
        found = {a["key"]: a["data"] for a in listed}
        assert "| finetuned |" in found["genpipe-summary"]
        assert "champion" in found["genpipe-summary"]
        assert found["genpipe-samples"].startswith("data:image/png;base64,")


def test_transient_failure_is_retried(repo, monkeypatch):
    from flows import pipeline

    monkeypatch.chdir(repo)
    _bin_path(monkeypatch)
    calls = {"n": 0}
    real = pipeline.run_dvc

    def flaky(*args: str) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise pipeline.StageFailed(
                "repro", "requests: Max retries exceeded: Connection refused"
            )
        return real(*args)

    monkeypatch.setattr(pipeline, "run_dvc", flaky)
    monkeypatch.setattr(pipeline, "RETRY_DELAYS", [0, 0, 0])
    with _harness():
        _, retrain = pipeline.build_flows()
        state = retrain(return_state=True)
    assert state.is_completed()
    assert calls["n"] == 1 + len(pipeline.stage_order())


def test_permanent_failure_fails_the_flow_and_moves_no_alias(repo, monkeypatch):
    from flows import pipeline

    monkeypatch.chdir(repo)
    _bin_path(monkeypatch)
    before = aliases(repo)
    attempts = {"n": 0}

    def broken(*args: str) -> str:
        attempts["n"] += 1
        raise pipeline.StageFailed("repro", "ValueError: checkpoint is for another architecture")

    monkeypatch.setattr(pipeline, "run_dvc", broken)
    with _harness():
        _, retrain = pipeline.build_flows()
        state = retrain(return_state=True)
    assert state.is_failed() and attempts["n"] == 1  # not retried: not transient
    assert aliases(repo) == before


def test_served_deployment_runs_when_triggered_through_the_api(repo, prefect_api):
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.deploy", "--name", "test", "--cron", "0 3 * * *"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        from prefect.deployments import run_deployment

        deadline = time.monotonic() + 300  # the served process starts Prefect and imports torch
        while True:
            try:
                flow_run = run_deployment("retrain_and_promote/test", timeout=600)
                break
            except Exception:
                assert served.poll() is None, served.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "deployment was not registered in 300 s"
                time.sleep(2)
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        served.terminate()
        served.wait(timeout=30)


def test_failed_run_moves_no_alias(repo):
    before = aliases(repo)
    edit_params(repo, {"evaluate": {"samples_per_class": 1}})  # invalid: stops evaluate
    commit(repo, "bad evaluate params")
    proc = subprocess.run(
        ["python", "-m", "flows.pipeline"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={k: v for k, v in pyfunc_env(repo).items() if k != "MLFLOW_TRACKING_URI"}
        | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode != 0
    assert "evaluate.samples_per_class" in proc.stdout + proc.stderr
    assert aliases(repo) == before
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "revert", "--no-edit", "HEAD")


def test_worse_candidate_is_not_promoted(repo):
    edit_params(repo, {"prior": {"optim": {"steps": 2}}})  # a barely trained prior
    commit(repo, "undertrained prior")
    run(["python", "-m", "flows.pipeline"], repo, ENV)
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert not decision["promote"], decision["reason"]
    assert aliases(repo)["champion"] == "1" and aliases(repo)["candidate"] == decision["version"]


def test_audit_names_data_changed_behind_dvcs_back(repo):
    raw = repo / "data/raw/labels.npy"
    import numpy as np

    labels = np.load(raw)
    labels[:5] = (labels[:5] + 1) % 10
    raw.unlink()  # DVC may have linked it to the cache; never write through the link
    np.save(raw, labels)
    run(["python", "-m", "flows.pipeline"], repo, ENV)
    version = json.loads((repo / "reports/register/decision.json").read_text())["version"]
    proc = subprocess.run(
        ["genpipe", "audit", "--model", f"genpipe-generator/{version}", "--no-rerun"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=pyfunc_env(repo) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIFFERS: data/raw: version" in proc.stderr


def test_audit_refuses_a_run_from_a_dirty_tree(repo):
    edit_params(repo, {"evaluate": {"samples_per_class": 6}})  # not committed
    run(["python", "-m", "flows.pipeline"], repo, ENV)
    version = json.loads((repo / "reports/register/decision.json").read_text())["version"]
    proc = subprocess.run(
        ["genpipe", "audit", "--model", f"genpipe-generator/{version}"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=pyfunc_env(repo) | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Verdict: unauditable" in proc.stdout and "dirty tree" in proc.stderr
