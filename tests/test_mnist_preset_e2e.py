"""The `mnist` preset end to end on a subset of the real MNIST, through the preset mechanism
a user takes (`genpipe preset mnist`, `genpipe data fetch mnist --per-class N`, `dvc add`,
the Prefect pipeline flow). Its shapes are the preset's (28x28 images, a 7x7 code grid, the
preset's prior); only the training steps and sample counts are cut, so it checks that every
stage runs at MNIST size, not the quality bars (bench/reference_runs.py measures those on the
full data). Skips where ../shared/datasets/mnist is absent, as on a user's clone."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, copy_repo, git, run
from tests.tiny import edit_params

REAL_MNIST = REPO.parent / "shared" / "datasets" / "mnist"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REAL_MNIST.is_dir(), reason=f"the real MNIST files are not at {REAL_MNIST} (optional)"
    ),
]
SHORT = {
    "pretrain": {"optim": {"steps": 10, "checkpoint_every": 0}},
    "judges": {"reward": {"optim": {"steps": 20}}, "evaluator": {"optim": {"steps": 20}}},
    "tokenizer": {"optim": {"steps": 20, "checkpoint_every": 0}},
    "prior": {"optim": {"steps": 20, "checkpoint_every": 0}, "samples_per_class": 4},
    "finetune": {"steps": 2, "eval_samples_per_class": 4},
    "evaluate": {"samples_per_class": 4},
}


def test_mnist_preset_runs_every_stage_on_a_subset(tmp_path, prefect_api):
    repo = copy_repo(tmp_path)
    env = {"MLFLOW_TRACKING_URI": None}
    run(["genpipe", "preset", "mnist"], repo, env)
    fetch = ["genpipe", "data", "fetch", "mnist", "--path", str(REAL_MNIST), "--per-class", "30"]
    run(fetch, repo, env)
    run(["dvc", "add", "-q", "data/raw"], repo, env)
    edit_params(repo, SHORT)
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "mnist subset")
    report = run(["python", "-m", "flows.pipeline"], repo, env, timeout=1500)

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert report.count(" ran ") == len(stages), report
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["prepare"]["params"]["params.yaml"]["base"]["preset"] == "mnist"
    card = json.loads((repo / "data/prepared/card.json").read_text())
    assert card["shape"] == [1, 28, 28]
    assert card["splits"]["test"]["count"] == 300  # the official test images, 30 per class
    codes = np.load(repo / "data/codes/train/codes.npy")
    assert codes.shape[1:] == (7, 7)  # the preset's grid
    evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
    for prior in ("base", "finetuned"):
        assert evaluate[prior]["fid_ratio"] > 0 and evaluate[prior]["fid_floor_n"] > 0
    decision = json.loads((repo / "reports/register/decision.json").read_text())
    assert decision["promote"] is True  # the first model, on a clean main
