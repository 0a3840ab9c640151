"""Caching DVC can trust: lineage stays out of the DVC-tracked bytes, so identical products
hash identically run after run, and the run that made an input is still found when its
sidecar is gone (outputs restored from DVC's run cache)."""

import json
from pathlib import Path

import pytest
import yaml

from genpipe import lineage
from genpipe.config import parse_params
from genpipe.data.raw import write_raw
from genpipe.data.sources import load_source
from genpipe.stages import prepare
from genpipe.tracking import store
from genpipe.tracking import write as tracking
from tests.conftest import copy_repo, git, run
from tests.tiny import write_tiny_params

PREPARED = Path("data/prepared")
ENV = {"MLFLOW_TRACKING_URI": None}


@pytest.fixture
def workdir(tmp_path, monkeypatch, mlflow_uri):
    write_raw(load_source("digits"), tmp_path / "data/raw")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sidecar(root: Path) -> dict:
    return json.loads(lineage.sidecar(root, PREPARED).read_text())


def test_identical_products_hash_identically_across_runs(workdir):
    params = parse_params({})
    prepare.run(params, workdir)
    first, first_run = lineage.dvc_md5(workdir / PREPARED), sidecar(workdir)["run_id"]
    prepare.run(params, workdir)
    assert lineage.dvc_md5(workdir / PREPARED) == first
    assert sidecar(workdir)["run_id"] != first_run  # two runs, one hash
    assert sidecar(workdir)["md5"] == first


def test_upstream_run_found_by_output_md5_without_sidecar(workdir):
    params = parse_params({})
    prepare.run(params, workdir)
    made_by = sidecar(workdir)["run_id"]
    lineage.sidecar(workdir, PREPARED).unlink()  # as after a run-cache restore
    with tracking.stage_run("downstream", params, (), [PREPARED], workdir) as handle:
        pass
    tags = store.client().get_run(handle.run_id).data.tags
    assert tags["upstream.prepare"] == made_by
    assert tags["dep.data/prepared"] == lineage.dvc_md5(workdir / PREPARED)


def test_stale_sidecar_is_not_trusted(workdir):
    params = parse_params({})
    prepare.run(params, workdir)
    record = {**sidecar(workdir), "md5": "0" * 32 + ".dir", "run_id": "not-a-run"}
    lineage.write_sidecar(workdir, PREPARED, record)
    mlflow = store.mlflow()
    found = tracking.find_producer(mlflow, workdir, PREPARED, lineage.dvc_md5(workdir / PREPARED))
    assert found is not None and found[0] == "prepare" and found[1] != "not-a-run"


# register's report names the registry version it created: a forced re-run registers a
# new version, so this uncached record of a side effect changes by design.
REGISTRY_RECORD = "register:reports/register"


def lock_md5s(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {
        f"{name}:{out['path']}": out["md5"]
        for name, stage in lock.items()
        for out in stage.get("outs", [])
        if f"{name}:{out['path']}" != REGISTRY_RECORD
    }


@pytest.mark.slow
def test_forced_repro_keeps_every_out_md5_and_tokenizer_rerun_stops_there(
    tmp_path_factory, prefect_api
):
    repo = copy_repo(tmp_path_factory.mktemp("cache"))
    write_tiny_params(repo)
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params")
    run(["genpipe", "data", "ensure"], repo, ENV)
    run(["dvc", "repro", "--force"], repo, ENV, timeout=1800)
    first = lock_md5s(repo)
    run(["dvc", "repro", "--force"], repo, ENV, timeout=1800)
    second = lock_md5s(repo)
    changed = {k: (first[k], second.get(k)) for k in first if first[k] != second.get(k)}
    assert not changed, changed
    assert len(first) >= 15, first

    out = run(["dvc", "repro", "--force", "--single-item", "tokenizer"], repo, ENV)
    assert "Running stage 'tokenizer'" in out
    again = run(["dvc", "repro"], repo, ENV)
    assert "Running stage" not in again, again
    assert lock_md5s(repo) == first


def test_model_file_bytes_do_not_depend_on_the_writing_process(tmp_path):
    """torch.save names the archive's root after the file it writes: a temporary name with a
    pid in it made every run's model bytes (and every hash downstream) differ."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "import sys, torch; from pathlib import Path; "
        "from genpipe.checkpoint import atomic_torch_save; "
        "atomic_torch_save({'w': torch.arange(4.0)}, Path(sys.argv[1]) / 'model.pt')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], env=env, check=True)
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.pt"]
