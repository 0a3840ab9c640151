"""Stage `judges`: two classifiers trained independently on the train split.

`reward` is what RL fine-tuning optimises against; `evaluator` (another architecture and
seed) only scores samples, so a generator that games the reward judge shows up in evaluation.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpipe import artifacts, curves, viz
from genpipe.artifacts.judges import judge_arch
from genpipe.checkpoint import Checkpoint
from genpipe.config import Judge, Params
from genpipe.data.prepared import load_split
from genpipe.evaluation import predictions
from genpipe.modelio import save_model
from genpipe.models.classifier import Classifier
from genpipe.outputs import write_json
from genpipe.spec import StageSpec
from genpipe.training import History, batch_indices, fit

SPEC = StageSpec(
    "judges",
    params=("prepare", "judges"),
    deps=(artifacts.PREPARED,),
    outs=(artifacts.JUDGES,),
    metrics=artifacts.metrics("judges"),
    plots=artifacts.plots("judges"),
)


def train_judge(
    cfg: Judge,
    arch: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    checkpoint: Checkpoint,
    on_step=None,
) -> tuple[Classifier, History]:
    """Cross-entropy training with its own seed (weights, dropout and batch order), from
    scratch or resuming `checkpoint`."""
    torch.manual_seed(cfg.seed)
    model = Classifier(**arch).to(device)
    x, y = x.to(device), y.to(device)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch_indices(len(x), cfg.optim.batch_size, cfg.seed, step).to(device)
        return F.cross_entropy(model(x[idx]).float(), y[idx]), {}

    final, history = fit(
        model, cfg.optim, loss_fn, checkpoint, f"judge {arch['arch']}", on_step=on_step
    )
    return final, history  # type: ignore[return-value]


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    ctx = SPEC.start(params, root)
    train_x, train_y = load_split("train", root / artifacts.PREPARED)
    test_x, test_y = load_split("test", root / artifacts.PREPARED)
    num_classes = int(train_y.max()) + 1
    with SPEC.record(params, root) as (run, (out, metrics_path, plots)):
        metrics: dict[str, Any] = {}
        for role in artifacts.JUDGE_ROLES:
            cfg: Judge = getattr(params.judges, role)
            arch = judge_arch(cfg, params, num_classes)
            every = cfg.optim.checkpoint_every if ctx.world.is_main else 0
            checkpoint = ctx.checkpoint.part(role, every)
            with curves.to(functools.partial(run.log_row, prefix=f"{role}/")):
                model, history = train_judge(cfg, arch, train_x, train_y, ctx.device, checkpoint)
            model = model.cpu()
            predicted = predictions(model, test_x)
            acc = float((predicted == test_y).double().mean())
            metrics[role] = {
                "test_accuracy": acc,
                "arch": cfg.arch,
                "seed": cfg.seed,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
            save_model(out / f"{role}.pt", "classifier", arch, model, role=role, seed=cfg.seed)
            run.log_history(history, prefix=f"{role}/")
            viz.write_curve(history, plots / f"loss_{role}.csv")
            confusion = [{"actual": int(a), "predicted": int(p)} for a, p in zip(test_y, predicted)]
            viz.write_curve(confusion, plots / f"confusion_{role}.csv")
            run.log_torch_model(model, role, test_x[:2].numpy())
        write_json(metrics_path, metrics)
        roles = artifacts.JUDGE_ROLES
        run.log_metrics({f"{r}.test_accuracy": metrics[r]["test_accuracy"] for r in roles})
    ctx.checkpoint.clear()
    return metrics
