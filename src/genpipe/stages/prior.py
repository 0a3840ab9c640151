"""Stage `prior`: learn p(codes | class) over the tokenizer's codes, with the kind that
`prior.kind` names (models/priors: `ar`, `diffusion`, `maskgit`, or one you add).

The kind says what the net trains on, its loss, its held-out metrics and how to sample it;
this stage trains any kind the same way. Metrics: the kind's validation metrics, sampling
throughput, and the share of samples the evaluator judge assigns to the requested class.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genpipe import artifacts, viz
from genpipe.artifacts.codes import load_codes
from genpipe.artifacts.judges import load_judge
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import Params
from genpipe.data.raw import DataError
from genpipe.evaluation import class_consistency
from genpipe.generator import Generator
from genpipe.modelio import save_model
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace, PriorKind
from genpipe.outputs import write_json
from genpipe.spec import StageContext, StageSpec
from genpipe.training import History, batch_indices, fit

SPEC = StageSpec(
    "prior",
    params=("prepare", "tokenizer", "prior"),
    deps=(artifacts.CODES, artifacts.TOKENIZER, artifacts.JUDGES),
    outs=(artifacts.PRIOR,),
    metrics=artifacts.metrics("prior"),
    plots=artifacts.plots("prior"),
)


def check_codes(card: dict[str, Any], codebook_size: int, grid: tuple[int, int]) -> None:
    """Refuse codes made by another tokenizer before any training."""
    if card["codebook_size"] != codebook_size or tuple(card["grid"]) != grid:
        raise DataError(
            f"{artifacts.CODES}/card.json: codes have codebook {card['codebook_size']} and grid "
            f"{card['grid']}, but the tokenizer has {codebook_size} and {list(grid)}; "
            "re-run `dvc repro tokenize`"
        )


def train(
    params: Params,
    kind: PriorKind,
    model: nn.Module,
    settings: dict[str, Any] | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    ctx: StageContext,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> tuple[nn.Module, History]:
    """Train `model` from scratch or resume `ctx.checkpoint`; returns the (EMA) weights in eval
    mode and the loss curve."""
    cfg = params.prior

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch_indices(len(x_train), cfg.optim.batch_size, params.base.seed, step)
        idx = idx.to(ctx.device)
        return kind.loss(model, settings, x_train[idx], y_train[idx], ctx.generator), {}

    return fit(
        model,
        cfg.train_optim,
        loss_fn,
        ctx.checkpoint,
        f"prior ({cfg.kind})",
        generators=(ctx.generator,),
        log_lr=True,
        compile=cfg.compile and ctx.device.type == "cuda",
        on_step=on_step,
    )


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.prior
    kind = prior_kind(cfg.kind)
    tokenizer = load_tokenizer(root / artifacts.TOKENIZER_FILE, params)
    grid = tokenizer.grid(params.prepare.image_size)
    train_codes, train_y, card = load_codes("train", root / artifacts.CODES)
    val_codes, val_y, _ = load_codes("val", root / artifacts.CODES)
    check_codes(card, tokenizer.codebook_size, grid)
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    ctx = SPEC.start(params, root, cfg.optim.checkpoint_every)
    device = ctx.device
    space = CodeSpace(tokenizer.codebook_size, grid, tokenizer.latent_dim, num_classes)
    arch = kind.from_params(cfg, space)
    settings = kind.settings(cfg)
    sampling = {**kind.sampling(cfg), **kind.calibrate(tokenizer, train_codes)}
    x_train = kind.inputs(tokenizer, train_codes, sampling).to(device)
    x_val = kind.inputs(tokenizer, val_codes, sampling).to(device)
    model = kind.build(arch).to(device)

    with SPEC.record(params, root) as (run, (out, metrics_path, plots)):
        t0 = time.perf_counter()
        final, history = train(params, kind, model, settings, x_train, train_y.to(device), ctx)
        train_seconds = time.perf_counter() - t0
        with torch.no_grad():
            metrics = kind.validate(final, settings, x_val, val_y.to(device), params.base.seed)
        gen = Generator(tokenizer.to(device), final, cfg.kind, sampling, settings)
        labels = torch.arange(num_classes, device=device).repeat_interleave(cfg.samples_per_class)
        t0 = time.perf_counter()
        images = gen(labels, torch.Generator(device).manual_seed(params.base.seed)).cpu()
        sample_seconds = time.perf_counter() - t0
        metrics["class_consistency"] = class_consistency(evaluator, images, labels.cpu())
        timing = {"train_seconds": train_seconds, "images_per_second": len(images) / sample_seconds}
        save_model(
            out / artifacts.PRIOR_FILE,
            "prior",
            arch,
            final.cpu(),
            prior_kind=cfg.kind,
            sampling=sampling,
            formulation=settings,
        )
        write_json(metrics_path, {"kind": cfg.kind, "train_steps": cfg.train_steps, **metrics})
        viz.write_curve(history, plots / "loss.csv")
        grid_img = viz.class_grid(images, cfg.samples_per_class, num_classes)
        viz.save_png(grid_img, plots / "samples.png")
        run.log_image(grid_img, "samples.png")
        run.log_metrics({**metrics, **timing})
        run.log_history(history)
    ctx.checkpoint.clear()
    return metrics
