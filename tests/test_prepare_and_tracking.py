"""The prepare stage in-process: outputs, dataset card, lineage (sidecar + MLflow), tags."""

import json

import numpy as np
import pytest

from genpipe.config import parse_params
from genpipe.data.raw import DataError, write_raw
from genpipe.data.sources import load_source
from genpipe.lineage import dvc_md5
from genpipe.outputs import staged
from genpipe.stages import prepare


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
