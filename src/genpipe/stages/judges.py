"""Stage `judges`: two classifiers trained independently on the train split.

`reward` is what RL fine-tuning optimises against; `evaluator` (another architecture and
seed) only scores samples, so a generator that games the reward judge shows up in evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from genpipe import artifacts, viz
from genpipe.artifacts.judges import judge_arch
from genpipe.checkpoint import Checkpoint
from genpipe.config import Judge, Params
from genpipe.data.prepared import load_split
from genpipe.distributed import SINGLE, World
from genpipe.evaluation import predictions
from genpipe.modelio import save_model
from genpipe.models.classifier import Classifier
from genpipe.outputs import write_json
from genpipe.runtime import to_device
from genpipe.spec import StageContext, StageSpec
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
    world: World = SINGLE,
    compile: bool = False,
) -> tuple[Classifier, History]:
    """Cross-entropy training with its own seed (weights, dropout and batch order), from
    scratch or resuming `checkpoint`; under torchrun on this rank's shard of each batch."""
    torch.manual_seed(cfg.seed)
    model = Classifier(**arch).to(device)
    x, y = to_device(x, device), to_device(y, device)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = world.shard(batch_indices(len(x), cfg.optim.batch_size, cfg.seed, step)).to(device)
        return F.cross_entropy(model(x[idx]).float(), y[idx]), {}

    final, history = fit(
        model,
        cfg.optim,
        loss_fn,
        checkpoint,
        f"judge {arch['arch']}",
        on_step=on_step,
        world=world,
        compile=compile,
    )
    return final, history  # type: ignore[return-value]


def train_all(
    params: Params, x: torch.Tensor, y: torch.Tensor, ctx: StageContext
) -> Iterator[tuple[str, Judge, dict[str, Any], Classifier, History]]:
    """Train each judge in turn (role, params, arch, model on CPU, curve); the checkpoint
    of each is saved by rank 0 only."""
    num_classes = int(y.max()) + 1
    for role in artifacts.JUDGE_ROLES:
        cfg: Judge = getattr(params.judges, role)
        arch = judge_arch(cfg, params, num_classes)
        every = cfg.optim.checkpoint_every if ctx.world.is_main else 0
        checkpoint = ctx.checkpoint.part(role, every)
        model, history = train_judge(
            cfg, arch, x, y, ctx.device, checkpoint, world=ctx.world, compile=ctx.compile
        )
        yield role, cfg, arch, model.cpu(), history


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    ctx = SPEC.start(params, root)
    train_x, train_y = load_split("train", root / artifacts.PREPARED)
    test_x, test_y = load_split("test", root / artifacts.PREPARED)
    if not ctx.world.is_main:  # other torchrun ranks train alongside rank 0, which writes
        for _ in train_all(params, train_x, train_y, ctx):
            pass
        return {}
    with SPEC.record(params, root) as (run, (out, metrics_path, plots)):
        metrics: dict[str, Any] = {}
        for role, cfg, arch, model, history in train_all(params, train_x, train_y, ctx):
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
