"""Promotion: the noise-aware gate, alias moves as the last step, strict champion reads, the
promotion lock, and experiments that register without moving aliases. On a tiny project
(tests/promotion_project.py): one trained prior and one with random weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genpipe import registry
from genpipe.stages import register
from tests import promotion_project as project

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from genpipe.runtime import cpu_threads

    root = tmp_path_factory.mktemp("promotion") / "project"
    root.mkdir()
    with cpu_threads(torch.device("cpu")):
        project.build(root)
    return root


@pytest.fixture
def root(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> Path:
    """A fresh copy of the project with its own MLflow store and intervals made fast."""
    here = tmp_path / "project"
    shutil.copytree(built, here)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv(registry.PROMOTION_FLOW_ENV, raising=False)
    monkeypatch.setattr(
        "genpipe.evaluation_intervals.sample_intervals",
        _fast(),
    )
    return here


def _fast():
    import functools

    from genpipe import evaluation_intervals

    return functools.partial(evaluation_intervals.sample_intervals, resamples=50)


def _register(root: Path) -> dict:
    return register.run(register.SPEC.view(project.params()), root)


def _aliases() -> dict[str, str]:
    client = registry.store.client()
    found = client.get_registered_model(registry.MODEL_NAME).aliases
    return {alias: str(version) for alias, version in found.items()}


def _tags(version: str) -> dict[str, str]:
    return registry.store.client().get_model_version(registry.MODEL_NAME, version).tags


METRICS = {
    "fid_ratio": 2.0, "fid_ratio_ci_low": 1.5, "fid_ratio_ci_high": 2.5,
    "class_consistency": 0.8, "class_consistency_ci_low": 0.7, "class_consistency_ci_high": 0.9,
}  # fmt: skip


def test_gate_needs_a_gain_beyond_the_noise():
    def with_ratio(value: float) -> dict[str, float]:
        return {**METRICS, "fid_ratio": value}

    # half-widths 0.5 and 0.5: the noise margin is hypot(0.5, 0.5) = 0.707
    assert not registry.decide(with_ratio(1.4), METRICS, "fid_ratio", True, 1.0).promote
    assert registry.decide(with_ratio(1.2), METRICS, "fid_ratio", True, 1.0).promote
    assert registry.decide(with_ratio(1.4), METRICS, "fid_ratio", True, 0.0).promote
    assert not registry.decide(METRICS, METRICS, "fid_ratio", True, 0.0).promote  # no gain
    worse_guard = {**with_ratio(0.5), "class_consistency": 0.6}  # drop 0.2 > 0.141
    decision = registry.decide(worse_guard, METRICS, "fid_ratio", True, 1.0)
    assert not decision.promote and "class_consistency" in decision.reason
    with pytest.raises(KeyError, match="re-run `dvc repro evaluate`"):
        registry.decide({"fid_ratio": 1.0, "class_consistency": 1.0}, None, "fid_ratio", True, 1)


def test_same_model_twice_never_promotes_itself(root):
    project.use(root, "good")
    first = _register(root)
    # the second run's evaluation is another draw of samples: pick one that scores better,
    # which a gate blind to the noise would promote
    for seed in range(1, 8):
        if project.use(root, "good", seed)["fid_ratio"] < first["candidate"]["fid_ratio"]:
            break
    else:
        pytest.fail("no evaluation draw of the same model scored better; widen the seed range")
    second = _register(root)
    assert first["promote"] and not second["promote"], second["reason"]
    assert "not above the noise margin" in second["reason"]
    assert _aliases() == {"champion": first["version"], "candidate": second["version"]}
    saved = json.loads((root / "reports/register/decision.json").read_text())
    assert saved["intervals"]["champion"]["fid_ratio"] == [
        first["candidate"][key] for key in ("fid_ratio", "fid_ratio_ci_low", "fid_ratio_ci_high")
    ]
    assert _tags(second["version"])["state"] == "candidate"


def test_a_better_model_replaces_a_degraded_champion(root):
    project.use(root, "random")
    degraded = _register(root)
    project.use(root, "good")
    better = _register(root)
    assert degraded["promote"] and better["promote"], better["reason"]
    assert _aliases() == {"champion": better["version"], "candidate": better["version"]}
    assert better["champion_version"] == degraded["version"]


def test_the_registered_generator_is_code_and_weights_with_an_optional_seed(root, tmp_path):
    import mlflow
    import numpy as np
    import pandas as pd
    import yaml

    project.use(root, "good")
    _register(root)
    uri = f"models:/{registry.MODEL_NAME}@champion"
    saved = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    flavor = yaml.safe_load((saved / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor and flavor["model_code_path"].endswith("serving.py")
    assert not list(saved.rglob("*.pkl"))  # nothing cloudpickled
    model = mlflow.pyfunc.load_model(uri)  # as serving and the registry load it
    inputs = {c.name: c.required for c in model.metadata.get_input_schema().inputs}
    assert inputs == {"label": True, "seed": False}
    unseeded = model.predict(pd.DataFrame({"label": [0, 2]}))
    seeded = model.predict(pd.DataFrame({"label": [0, 2], "seed": [0, 0]}))
    other = model.predict(pd.DataFrame({"label": [0, 2], "seed": [4, 4]}))
    assert unseeded.shape == (2, 1, 8, 8) and unseeded.dtype == np.float32
    assert np.array_equal(unseeded, seeded) and not np.array_equal(seeded, other)


def test_a_failure_before_the_alias_step_moves_no_alias(root, monkeypatch):
    project.use(root, "good")
    champion = _register(root)["version"]

    def broken(*args, **kwargs):  # after evaluation and logging, while lineage is written
        raise OSError("disk full")

    monkeypatch.setattr("genpipe.tracking.write.lineage.output_digests", broken)
    with pytest.raises(OSError, match="disk full"):
        _register(root)
    assert _aliases() == {"champion": champion, "candidate": champion}
    failed = str(int(champion) + 1)
    assert _tags(failed)["state"] == "failed" and "disk full" in _tags(failed)["error"]


def test_only_a_missing_model_or_alias_means_no_champion(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST

    def client(error: MlflowException | None = None, aliases: dict | None = None):
        def get_registered_model(name):
            if error is not None:
                raise error
            return SimpleNamespace(aliases=aliases)

        return lambda: SimpleNamespace(get_registered_model=get_registered_model)

    missing = MlflowException("no model", error_code=RESOURCE_DOES_NOT_EXIST)
    monkeypatch.setattr(registry.store, "client", client(missing))
    assert registry.champion_version() is None
    monkeypatch.setattr(registry.store, "client", client(aliases={"candidate": 3}))
    assert registry.champion_version() is None
    monkeypatch.setattr(registry.store, "client", client(aliases={"champion": 3}))
    assert registry.champion_version() == "3"
    locked = MlflowException("database is locked", error_code=INTERNAL_ERROR)
    monkeypatch.setattr(registry.store, "client", client(locked))
    with pytest.raises(MlflowException, match="database is locked"):
        registry.champion()


def test_an_experiment_registers_without_moving_aliases(root, monkeypatch):
    project.use(root, "good")
    champion = _register(root)["version"]
    project.use(root, "random")
    monkeypatch.setenv("DVC_EXP_NAME", "curly-bolt")
    report = _register(root)
    assert not report["promote"] and report["aliases_moved"] == []
    assert _aliases() == {"champion": champion, "candidate": champion}
    assert _tags(report["version"])["experiment"] == "curly-bolt"


def test_a_dirty_tree_is_not_promoted(root):
    project.use(root, "good")
    (root / "README").write_text("edited, not committed\n")
    report = _register(root)
    assert not report["promote"] and "unauditable" in report["reason"]
    assert _aliases() == {"candidate": report["version"]}


def test_two_racing_registers_move_champion_once(root):
    # two checkouts (as two clones or `dvc exp run --temp` copies) on one MLflow store
    project.use(root, "good")
    other = root.with_name("other")
    shutil.copytree(root, other)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.promotion_project", str(here)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for here in (root, other)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    for _, err in outs:  # nothing a user cannot act on
        for noise in ("CloudPickle", "integer column", "Downloading", "example", "signature"):
            assert noise not in err, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["promote"] for r in results) == [False, True]
    winner = next(r["version"] for r in results if r["promote"])
    assert _aliases()["champion"] == winner


def test_champion_is_compare_and_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = registry.store.client()
    client.create_registered_model(registry.MODEL_NAME)
    for _ in range(2):
        client.create_model_version(registry.MODEL_NAME, (tmp_path / "m").as_uri())
    registry.move_aliases("1", True, None)
    with pytest.raises(registry.ChampionMoved, match="from version None to 1"):
        registry.move_aliases("2", True, None)  # decided when there was no champion
    assert _aliases() == {"champion": "1", "candidate": "1"}
    registry.move_aliases("2", True, "1")
    assert _aliases() == {"champion": "2", "candidate": "2"}


def test_a_champion_that_moves_while_deciding_is_decided_against_again(monkeypatch):
    reads = iter(["1", "2", "2", "2"])  # moved to 2 between the first read and its check
    monkeypatch.setattr(registry, "champion_version", lambda: next(reads))
    monkeypatch.setattr(registry, "champion", lambda: (registry.champion_version(), None))
    scored = {"1": {**METRICS, "fid_ratio": 9.0}, "2": {**METRICS, "fid_ratio": 0.5}}
    calls = iter(["1", "2"])
    monkeypatch.setattr(register, "_score", lambda gen, params, root: scored[next(calls)])
    found, champion, decision = register._settle(METRICS, project.params(), Path("."))
    assert found == "2" and champion == scored["2"] and not decision.promote


def test_only_main_or_the_flow_may_promote(built, tmp_path, monkeypatch):
    here = tmp_path / "project"
    shutil.copytree(built, here)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv(registry.PROMOTION_FLOW_ENV, raising=False)
    assert register.workspace(here)["blocked"] is None  # clean, on main
    subprocess.run(["git", "checkout", "-qb", "feature"], cwd=here, check=True)
    assert "branch 'feature'" in register.workspace(here)["blocked"]
    monkeypatch.setenv(registry.PROMOTION_FLOW_ENV, "1")
    assert register.workspace(here)["blocked"] is None
    (here / "README").write_text("edited\n")
    assert "unauditable" in register.workspace(here)["blocked"]  # the flow needs a clean tree
