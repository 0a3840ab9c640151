"""Data-parallel training under torchrun (gloo, CPU), two processes.

tests/ddp_worker.py (under torchrun) trains pretrain, both judges, tokenizer and prior on two
ranks against the same training on one process at the same global batch, resumes under DDP,
and runs RL (finetune.train) on two ranks against one; here, the stage commands
(`python -m flows.stage`, the `genpipe` script) run finetune under torchrun against one
process, and the pieces (group sharding, per-rank streams, the flow on rank 0) run in one
process.

finetune is compared byte for byte: each group draws its own noise and its own gradient, and
the gradients are added in global group order. The other stages' 2-vs-1 tolerance: relative
L2 distance of all weights at most 1e-3 (the worker's TOL). Not bytes: a rank's loss is the
mean over its shard, so the averaged gradient equals the whole batch's only up to float
summation order (~1e-6 relative), and Adam turns the sign of a mathematically zero gradient
(a bias just before BatchNorm) into a full lr-sized step. Per-sample noise (dropout, class
dropout) is drawn per rank, from forks of the shared streams, so those comparisons switch it
off; SimCLR's augmentations are drawn for the global batch and stay on. Resume under DDP is
compared byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml

from genpipe.config import load_params
from genpipe.data.raw import write_raw
from genpipe.data.sources import load_source
from genpipe.distributed import World
from genpipe.runtime import cpu_threads
from genpipe.stages import run_stage
from tests.tiny import merge

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"
PRIOR = "models/prior/prior.pt"
TINY = yaml.safe_load((REPO / "presets" / "tiny.yaml").read_text())
# The upstream models are inputs only (each test trains its own): a few steps will do.
FEW_STEPS = {
    "judges": {role: {"optim": {"steps": 8}} for role in ("reward", "evaluator")},
    "tokenizer": {"optim": {"steps": 8}},
    "prior": {"optim": {"steps": 8}},
}
# What each stage reads from the stages before it, shared by every run below.
INPUTS = {
    "pretrain": ["data/prepared"],
    "judges": ["data/prepared"],
    "prior": ["data/codes", "models/tokenizer", "models/judges"],
    "finetune": ["data/prepared", "models/prior", "models/tokenizer", "models/judges"],
}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, mlflow_uri) -> Path:
    """The tiny pipeline's outputs up to the prior, made in this process."""
    root = tmp_path_factory.mktemp("ddp_upstream")
    write_raw(load_source("digits"), root / "data/raw")
    (root / "params.yaml").write_text(yaml.safe_dump(merge(TINY, FEW_STEPS)))
    params = load_params(root / "params.yaml")
    with cpu_threads(torch.device("cpu")):
        for stage in ("prepare", "judges", "tokenizer", "tokenize", "prior"):
            run_stage(stage, params, root)
    return root


def _root(upstream: Path, base: Path, stage: str, extra: dict) -> Path:
    """A fresh project folder with the stage's inputs (links) and params."""
    base.mkdir(parents=True)
    for rel in INPUTS[stage]:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(upstream / rel, base / rel)
    (base / "params.yaml").write_text(yaml.safe_dump(merge(TINY, extra)))
    return base


def torchrun(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(path: Path) -> torch.Tensor:
    state = torch.load(path, weights_only=False)["state_dict"]
    return torch.cat([v.double().flatten() for k, v in state.items() if v.is_floating_point()])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def _curve(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, line.split(","), strict=True)) for line in lines[1:]]


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file finetune writes, by path."""
    outs = [root / "models/finetune", root / "plots/finetune", root / "metrics/finetune.json"]
    files = [f for out in outs for f in ([out] if out.is_file() else sorted(out.rglob("*")))]
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in files if f.is_file()}


def _finetune_root(upstream: Path, base: Path) -> Path:
    """A project for 3 steps of RL that the upstream's 8-step judge could not guide: a reward
    of ink (mean pixel), at lr 1e-2, so the weights kept are trained ones."""
    ink = {"rewards": {"ink": 1.0}, "reward_entry_points": {"ink": "ink_reward:ink"}}
    finetune = {"steps": 3, "lr": 1e-2, "rail_window": 1, **ink}
    root = _root(upstream, base, "finetune", {"finetune": finetune})
    (root / "ink_reward.py").write_text(
        "def ink(images, labels):\n    return images.flatten(1).mean(1)\n"
    )
    return root


def _runs(root: Path) -> list[Any]:
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`genpipe.root` = '{root.resolve()}'")


@pytest.mark.slow
def test_stage_commands_under_torchrun_give_one_process_outputs(
    upstream, tmp_path, prefect_api, one_thread
):
    """`torchrun --nproc_per_node 2 -m flows.stage finetune` and the `genpipe` console script
    under torchrun (`--no-python genpipe stage finetune`) exit 0 and write the bytes one
    process writes (weights, metrics, curves, sample grids); rank 0 alone writes them and
    logs the one MLflow run (the flow's run, tagged with its Prefect flow run), and shows the
    one progress bar."""
    one = _finetune_root(upstream, tmp_path / "one")
    run_stage("finetune", load_params(one / "params.yaml"), one)
    expected = _outputs(one)
    metrics = json.loads(expected["metrics/finetune.json"])
    assert metrics["steps_run"] == 3 and metrics["best_step"] > 0, metrics
    assert _weights(one / "models/finetune/prior.pt").ne(_weights(upstream / PRIOR)).any()
    genpipe = Path(sys.executable).parent / "genpipe"
    commands = {
        "flow": ["-m", "flows.stage", "finetune"],
        "cli": ["--no-python", str(genpipe), "stage", "finetune"],
    }
    for name, command in commands.items():
        root = _finetune_root(upstream, tmp_path / name)
        proc = torchrun(root, *command, env={"PREFECT_API_URL": prefect_api})
        assert _outputs(root) == expected, name
        runs = _runs(root)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", name
        assert ("prefect.flow_run_id" in runs[0].data.tags) == (name == "flow")
        assert proc.stderr.count("finetune:") == 1, name  # one progress bar: rank 0's
        assert not (root / "checkpoints/finetune").exists() or not any(
            (root / "checkpoints/finetune").iterdir()
        )


def test_flow_runs_on_rank_0_only(monkeypatch, tmp_path):
    """`python -m flows.stage` under torchrun: rank 0 runs the Prefect flow, another rank the
    stage alone (no flow, no temporary Prefect server of its own)."""
    import flows.stage as flow_stage

    calls: list[str] = []
    monkeypatch.setattr(flow_stage, "check_reachable", lambda: None)
    monkeypatch.setattr(flow_stage, "run_stage", lambda name, params: calls.append(f"run {name}"))
    monkeypatch.setattr(flow_stage, "run_flow", lambda name, path: calls.append(f"flow {name}"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    params_path = str(tmp_path / "params.yaml")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        flow_stage.main(["judges", params_path])
    assert calls == ["run judges", "flow judges"]


def test_shard_groups_gives_each_rank_whole_groups():
    labels = torch.arange(6).repeat_interleave(4)  # 6 groups of 4
    shards = [World(r, 3).shard_groups(labels, 4) for r in range(3)]
    for r, shard in enumerate(shards):
        groups = shard.view(-1, 4)
        assert (groups == groups[:, :1]).all()  # whole groups only
        assert groups[:, 0].tolist() == [r, r + 3]
    assert sorted(torch.cat(shards).tolist()) == labels.tolist()
    with pytest.raises(ValueError, match="prompts_per_step"):
        World(0, 4).shard_groups(labels, 4)


def test_rank_streams_fork_per_rank_and_return_to_the_shared_stream():
    def draws(rank: int, size: int) -> tuple[list[float], list[float]]:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        inside = []
        for _ in range(2):
            with World(rank, size).rank_streams([g]):
                inside.append(float(torch.rand(1, generator=g)) + float(torch.rand(1)))
        return inside, [float(torch.rand(1, generator=g)), float(torch.rand(1))]

    (a0, after0), (a1, after1) = draws(0, 2), draws(1, 2)
    assert a0 != a1 and a0[0] != a0[1]  # ranks, and steps, draw differently
    assert after0 == after1  # and then share the stream again
    single_inside, _ = draws(0, 1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    expected = [float(torch.rand(1, generator=g)) + float(torch.rand(1)) for _ in range(2)]
    assert single_inside == expected  # one process draws from the shared streams themselves


@pytest.mark.slow
def test_every_stage_trains_alike_on_two_processes_and_resumes(upstream, tmp_path):
    """tests/ddp_worker.py under two processes: pretrain, both judges, tokenizer and prior
    train to within TOL of one process at the same global batch, both ranks holding the same
    weights; the prior stopped after a checkpoint and resumed ends with the bytes of a run
    never stopped (dropout on: per-rank streams resume too)."""
    proc = torchrun(tmp_path, str(WORKER), "--pipeline", str(upstream), "stages", "resume")
    for name in ("pretrain", "judges.reward", "judges.evaluator", "tokenizer", "prior"):
        assert f"{name}: 2 processes vs 1" in proc.stdout, proc.stdout
    assert "resume: same bytes on every rank" in proc.stdout, proc.stdout


def test_finetune_on_two_processes_gives_one_process_bytes(tmp_path):
    """RL on two processes against one at the same global batch (4 groups of 4, 3 steps), for
    a tiny ar and a tiny diffusion prior: the same weights and history to the byte, each rank
    sampling whole groups of every step's prompts."""
    proc = torchrun(tmp_path, str(WORKER), "rl")
    for kind in ("ar", "diffusion"):
        line = f"finetune {kind}: 2 processes vs 1, same bytes; whole groups per rank"
        assert line in proc.stdout, proc.stdout
