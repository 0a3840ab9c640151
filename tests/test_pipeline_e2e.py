"""The default pipeline end to end, as a user runs it: a fresh git copy of the repo,
`genpipe data ensure`, then the Prefect pipeline flow over `dvc repro`. Later assertions
check every stage's quality bars from its metrics file (real training, fixed seeds)."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, prefect_api):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    env = {"MLFLOW_TRACKING_URI": None}
    run(["genpipe", "data", "ensure"], repo, env)
    report = run(["python", "-m", "flows.pipeline"], repo, env)
    return repo, report, env


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def test_every_stage_ran_and_locked(pipeline):
    repo, report, _ = pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert set(lock) == set(stages)
    for name, stage in stages.items():
        assert f"{name} " in report
        for out in stage.get("outs", []):
            folder = out if isinstance(out, str) else next(iter(out))
            assert not (repo / folder / "meta.json").exists()
            side = json.loads((repo / ".genpipe/lineage" / f"{folder}.json").read_text())
            assert side["stage"] == name, side
    assert report.count(" ran ") == len(stages)


def test_second_repro_has_nothing_to_do_and_status_is_clean(pipeline):
    repo, _, env = pipeline
    out = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in out
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_mlflow_run_carries_lineage(pipeline):
    repo, _, _ = pipeline
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    side = json.loads((repo / ".genpipe/lineage/data/prepared.json").read_text())
    run_ = client.get_run(side["run_id"])
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    raw_md5 = next(d["md5"] for d in lock["deps"] if d["path"] == "data/raw")
    assert run_.data.tags["dep.data/raw"] == raw_md5
    commit = run(["git", "rev-parse", "HEAD"], repo).strip()
    assert run_.data.tags["git.commit"] == commit and run_.data.tags["git.dirty"] == "False"
    assert run_.inputs.dataset_inputs
    assert (repo / "mlartifacts").is_dir()


def test_dataset_card_counts(pipeline):
    repo, _, _ = pipeline
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert "card" not in metrics(repo, "prepare")  # dvc exp show leads with real metrics
    assert sum(s["count"] for s in card["splits"].values()) == 1797
    assert all(n > 0 for s in card["splits"].values() for n in s["per_class"].values())


# -- quality bars of the default pipeline (real training on the bundled digits, fixed seeds) --


def test_tokenizer_bars(pipeline):
    test = metrics(pipeline[0], "tokenizer")["test"]
    assert test["psnr"] >= 24.0, test
    assert test["codebook_usage"] >= 0.90, test


def test_pretrain_bars(pipeline):
    m = metrics(pipeline[0], "pretrain")
    assert m["ssl"]["linear_probe"] >= 0.95, m
    assert m["ssl"]["linear_probe"] - m["random_init"]["linear_probe"] >= 0.05, m


def test_judges_bars(pipeline):
    m = metrics(pipeline[0], "judges")
    for role in ("reward", "evaluator"):  # the confusion plot holds every test prediction
        rows = (pipeline[0] / f"plots/judges/confusion_{role}.csv").read_text().split()[1:]
        right = sum(a == p for a, p in (r.split(",") for r in rows)) / len(rows)
        assert abs(right - m[role]["test_accuracy"]) < 1e-9, role
    assert m["reward"]["test_accuracy"] >= 0.97 and m["evaluator"]["test_accuracy"] >= 0.97, m
    assert (
        m["reward"]["arch"] != m["evaluator"]["arch"]
        and m["reward"]["seed"] != m["evaluator"]["seed"]
    )


def test_ar_prior_bar(pipeline):
    m = metrics(pipeline[0], "prior")
    assert m["kind"] == "ar" and m["class_consistency"] >= 0.85, m


def test_finetune_bars(pipeline):
    m = metrics(pipeline[0], "finetune")
    before, after = m["before"], m["after"]
    assert after["class_consistency"] >= min(before["class_consistency"] + 0.05, 0.97), m
    assert after["fid"] <= 1.1 * before["fid"], m


def test_evaluation_and_champion(pipeline):
    repo = pipeline[0]
    m = metrics(repo, "evaluate")
    for prior in ("base", "finetuned"):
        assert m[prior]["fid_floor"] > 0 and m[prior]["fid_ratio"] > 0
        assert 0 <= m[prior]["precision"] <= 1 and 0 <= m[prior]["recall"] <= 1
    assert (repo / "plots/evaluate/samples_finetuned.png").stat().st_size > 0
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert decision["promote"] and decision["version"] == "1"


def test_diffusion_prior_through_dvc_exp_run(pipeline):
    repo, _, env = pipeline
    run(["dvc", "exp", "run", "-S", "prior.kind=diffusion"], repo, env, timeout=1200)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    exps = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert exps, shown
    m = metrics(repo, "prior")  # `dvc exp run` leaves the experiment in the workspace
    assert m["kind"] == "diffusion" and m["class_consistency"] >= 0.85, m
    assert metrics(repo, "finetune")["steps_run"] > 0


def test_diffusion_finetune_bars(pipeline):
    repo = pipeline[0]
    assert metrics(repo, "prior")["kind"] == "diffusion"  # after the experiment above
    ft = metrics(repo, "finetune")
    assert ft["after"]["class_consistency"] >= min(
        ft["before"]["class_consistency"] + 0.05, 0.97
    ), ft
    assert ft["after"]["fid"] <= 1.1 * ft["before"]["fid"], ft
