"""Stage `judges`: two classifiers trained independently on the train split.

`reward` is what RL fine-tuning optimises against; `evaluator` (another architecture and
seed) only scores samples, so a generator that games the reward judge shows up in evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe.config import Judge, Params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.evaluation import class_consistency
from genpipe.modelio import ModelFileError, load_model, save_model
from genpipe.models.classifier import Classifier
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.tracking import write as tracking
from genpipe.training import autocast, batch_indices, make_optimizer, steps

OUT = Path("models/judges")
METRICS = Path("metrics/judges.json")
ROLES = ("reward", "evaluator")


def load_judge(root: Path, role: str, num_classes: int) -> Classifier:
    """A trained judge, frozen; refused when it was trained for another number of classes."""
    path = root / OUT / f"{role}.pt"
    model, blob = load_model(path, "classifier", Classifier)
    assert isinstance(model, Classifier)
    if blob["arch"]["num_classes"] != num_classes:
        raise ModelFileError(
            f"{path}: judges {blob['arch']['num_classes']} classes but the data has "
            f"{num_classes}; re-run `dvc repro`"
        )
    return model.requires_grad_(False)  # load_model returns it in eval mode


def judge_arch(cfg: Judge, params: Params, num_classes: int) -> dict[str, Any]:
    return {
        "arch": cfg.arch,
        "in_channels": params.prepare.channels,
        "image_size": params.prepare.image_size,
        "num_classes": num_classes,
        "width": cfg.width,
        "dropout": cfg.dropout,
    }


def train_judge(
    cfg: Judge, arch: dict[str, Any], x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[Classifier, list[dict[str, float]]]:
    """Cross-entropy training with its own seed (weights, dropout and batch order)."""
    torch.manual_seed(cfg.seed)
    model = Classifier(**arch).to(device)
    opt_cfg = cfg.optim
    opt, sched = make_optimizer(
        model, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    x, y = x.to(device), y.to(device)
    history = []
    model.train()
    for step in steps(0, opt_cfg.steps, f"judge {arch['arch']}"):
        idx = batch_indices(len(x), opt_cfg.batch_size, cfg.seed, step).to(device)
        with autocast(device):
            loss = F.cross_entropy(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == opt_cfg.steps - 1:
            history.append({"step": step, "loss": loss.item()})
    return model.eval(), history


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    deps = [PREPARED]
    ctx = common.start("judges", params, ("prepare", "judges"), deps, root, 0)
    train_x, train_y = load_split("train", root / PREPARED)
    test_x, test_y = load_split("test", root / PREPARED)
    num_classes = int(train_y.max()) + 1
    with (
        tracking.stage_run(
            "judges", params, ("prepare", "judges"), deps, root, outs=[OUT, METRICS]
        ) as run,
        staged(root / OUT, root / METRICS) as (out, metrics_path),
    ):
        metrics: dict[str, Any] = {}
        for role in ROLES:
            cfg: Judge = getattr(params.judges, role)
            arch = judge_arch(cfg, params, num_classes)
            model, history = train_judge(cfg, arch, train_x, train_y, ctx.device)
            model = model.cpu()
            acc = class_consistency(model, test_x, test_y)
            metrics[role] = {
                "test_accuracy": acc,
                "arch": cfg.arch,
                "seed": cfg.seed,
                "parameters": sum(p.numel() for p in model.parameters()),
            }
            save_model(out / f"{role}.pt", "classifier", arch, model, role=role, seed=cfg.seed)
            run.log_history(history, prefix=f"{role}/")
            run.log_torch_model(model, role, test_x[:2].numpy())
        write_json(metrics_path, metrics)
        run.log_metrics({f"{r}.test_accuracy": metrics[r]["test_accuracy"] for r in ROLES})
        run.write_meta(out)
    return metrics
