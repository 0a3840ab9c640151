"""The prepare stage in-process: outputs, dataset card, lineage (sidecar + MLflow), tags; and
the MLflow shape of any stage run: live curves, system metrics, one parent run per pipeline."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from genpipe.checkpoint import Checkpoint
from genpipe.config import Optim, parse_params
from genpipe.data.raw import DataError, write_raw
from genpipe.data.sources import load_source
from genpipe.lineage import dvc_md5
from genpipe.outputs import staged
from genpipe.spec import StageSpec
from genpipe.stages import prepare
from genpipe.tracking import parent
from genpipe.training import fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_uri):
    write_raw(load_source("digits"), tmp_path / "data/raw")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_prepare_writes_splits_card_and_lineage(workdir):
    import mlflow

    params = parse_params({"base": {"seed": 5}})
    card = prepare.run(params, workdir)
    x = np.load(workdir / "data/prepared/train/images.npy")
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert x.min() >= 0.0 and x.max() == 1.0
    assert sum(card["splits"][s]["count"] for s in ("train", "val", "test")) == 1797
    metrics = json.loads((workdir / "metrics/prepare.json").read_text())
    assert metrics["test_count"] == card["splits"]["test"]["count"]

    assert not (workdir / "data/prepared/meta.json").exists()  # lineage stays out of outs
    side = json.loads((workdir / ".genpipe/lineage/data/prepared.json").read_text())
    assert side["stage"] == "prepare" and side["md5"] == dvc_md5(workdir / "data/prepared")
    meta = mlflow.artifacts.load_dict(f"runs:/{side['run_id']}/lineage/meta.json")
    assert meta["stage"] == "prepare" and meta["seed"] == 5 and meta["run_id"] == side["run_id"]
    assert meta["deps"]["data/raw"] == dvc_md5(workdir / "data/raw")
    assert meta["versions"]["torch"]
    run = mlflow.get_run(meta["run_id"])
    assert run.info.run_name == "prepare" and run.info.status == "FINISHED"
    assert run.data.tags["dep.data/raw"] == meta["deps"]["data/raw"]
    assert run.data.tags["params.hash"] == params.digest("prepare")
    assert run.data.tags["dvc.stage"] == "prepare"
    assert "git.commit" in run.data.tags and "version.torch" in run.data.tags
    assert run.data.params["prepare.train_frac"] == "0.7"
    assert len(run.inputs.dataset_inputs) == 3


def test_prepare_is_byte_deterministic(workdir):
    params = parse_params({})
    prepare.run(params, workdir)
    first = {p: p.read_bytes() for p in (workdir / "data/prepared").rglob("*.npy")}
    prepare.run(params, workdir)
    assert first == {p: p.read_bytes() for p in (workdir / "data/prepared").rglob("*.npy")}


def test_corrupt_raw_fails_before_writing(workdir):
    (workdir / "data/raw/labels.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="labels.npy"):
        prepare.run(parse_params({}), workdir)
    assert not (workdir / "data/prepared").exists()
    assert not (workdir / "metrics").exists()


def test_class_with_too_few_images_is_named(workdir):
    data = load_source("digits")
    keep = [i for i, y in enumerate(data.labels) if y != 7][:300] + [
        int(np.flatnonzero(data.labels == 7)[0])
    ]
    subset = type(data)(
        [data.images[i] for i in keep],
        data.labels[keep],
        data.classes,
        "digits",
        [data.origins[i] for i in keep],
    )
    write_raw(subset, workdir / "data/raw")
    with pytest.raises(DataError, match="class '7' has 1 image"):
        prepare.run(parse_params({}), workdir)


def test_staged_outputs_keep_old_files_when_the_body_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged(out) as (tmp,):
        tmp.mkdir()
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- the MLflow shape of a run: live curves, system metrics, one parent per pipeline --


def _stage(name: str) -> StageSpec:
    return StageSpec(name, params=(), deps=())


def test_curves_reach_mlflow_during_training_and_system_metrics_are_recorded(
    tmp_path, monkeypatch, mlflow_uri
):
    import mlflow

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    params = parse_params({})
    model = torch.nn.Linear(2, 1)
    x = torch.randn(8, 2)
    cfg = Optim(steps=60, warmup_steps=0, checkpoint_every=0)
    seen_while_training: list[tuple[int, int]] = []

    def loss_fn(step: int) -> tuple[torch.Tensor, dict]:
        return model(x).pow(2).mean(), {"norm": model.weight.norm()}

    def on_step(step: int, _model: torch.nn.Module) -> None:
        if step == 55:  # rows 0, 25 and 50 are in the store before training ends
            mlflow.flush_async_logging()
            history = mlflow.MlflowClient().get_metric_history(run.run_id, "train/loss")
            seen_while_training.extend((m.step, m.timestamp) for m in history)
        time.sleep(0.005)  # a step of real training takes time: rows get distinct stamps

    with _stage("curves").record(params, tmp_path) as (run, _):
        checkpoint = Checkpoint(tmp_path / "ckpt.pt", "f", 0)
        _, history = fit(model, cfg, loss_fn, checkpoint, "test", on_step=on_step)
        run.log_history([{"step": 7, "loss": 2.0}, *history])  # a resumed run's older row
        time.sleep(0.5)  # several system-metrics samples
    assert [s for s, _ in seen_while_training] == [0, 25, 50]
    client = mlflow.MlflowClient()
    curve = client.get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in curve) == [0, 7, 25, 50, 59]  # each row once
    stamps = [m.timestamp for m in sorted(curve, key=lambda m: m.step) if m.step != 7]
    assert stamps == sorted(stamps) and len(set(stamps)) == 4
    assert [m.step for m in client.get_metric_history(run.run_id, "train/norm")] == [0, 25, 50, 59]
    metrics = client.get_run(run.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/system_memory_usage") for k in metrics), sorted(metrics)


def test_stage_runs_of_one_pipeline_nest_under_one_parent(tmp_path, monkeypatch, mlflow_uri):
    import mlflow

    key = f"prefect:{uuid.uuid4()}"
    tags = {"prefect.flow_run_id": key.removeprefix("prefect:")}
    monkeypatch.setenv(parent.PIPELINE_ENV, parent.describe(key, "pipeline nightly", tags))
    monkeypatch.setenv("DVC_EXP_NAME", "curly-bolt")
    params = parse_params({})
    with _stage("first").record(params, tmp_path) as (first, _):
        pass
    with pytest.raises(RuntimeError, match="boom"), _stage("second").record(params, tmp_path):
        raise RuntimeError("boom")
    group = mlflow.search_runs(
        filter_string=f"tags.`genpipe.pipeline` = '{key}'", output_format="list"
    )
    parents = [r for r in group if r.data.tags.get(parent.PARENT_TAG) == "true"]
    stages = {r.info.run_name: r for r in group if "dvc.stage" in r.data.tags}
    assert len(parents) == 1 and set(stages) == {"first", "second"}
    top = parents[0]
    assert top.info.run_name == "pipeline nightly" and top.info.status == "FAILED"
    assert top.data.tags["prefect.flow_run_id"] == tags["prefect.flow_run_id"]
    for run in (top, *stages.values()):
        assert run.data.tags["dvc.exp_name"] == "curly-bolt"
    for run in stages.values():
        assert run.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert stages["second"].info.status == "FAILED"

    with _stage("third").record(params, tmp_path) as (third, _):
        assert mlflow.get_run(top.info.run_id).info.status == "RUNNING"
    assert mlflow.get_run(top.info.run_id).info.status == "FINISHED"  # as its last stage
    assert mlflow.get_run(third.run_id).data.tags["mlflow.parentRunId"] == top.info.run_id

    monkeypatch.delenv(parent.PIPELINE_ENV)
    with _stage("alone").record(params, tmp_path) as (alone, _):
        pass
    assert "mlflow.parentRunId" not in mlflow.get_run(alone.run_id).data.tags


def test_stage_commands_of_one_dvc_process_share_a_pipeline_key(tmp_path):
    show = "from genpipe.tracking import parent; p = parent.current(); print(p and p.key)"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}", "DVC_STAGE": "prepare"}
    env.pop(parent.PIPELINE_ENV, None)
    stage = f"{sys.executable} -c '{show}'"

    def key(cmd: list[str], **extra: str) -> str:
        out = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)
        return out.stdout.strip() or out.stderr

    # this process plays DVC: it runs two stage commands through a shell, as DVC does
    first, second = key(["sh", "-c", stage]), key(["sh", "-c", stage])
    assert first == second and first.startswith("dvc:") and f":{os.getpid()}:" in first
    other_dvc = [
        sys.executable,
        "-c",
        f"import subprocess; subprocess.run(['sh', '-c', {stage!r}])",
    ]
    assert key(other_dvc) not in (first, "None")
    assert key(["sh", "-c", stage], DVC_STAGE="") == "None"  # not under DVC: no group
