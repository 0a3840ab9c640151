"""Stage `prior`: learn p(codes | class) over the tokenizer's codes, with the kind that
`prior.kind` names (models/priors: `ar`, `diffusion`, `maskgit`, or one you add).

The kind says what the net trains on, its loss, its held-out metrics and how to sample it;
this stage trains any kind the same way. Metrics: the kind's validation metrics, sampling
throughput, and the share of samples the evaluator judge assigns to the requested class.

With `prior.align_weight > 0` (REPA, genpipe.models.align) a block's hidden states are also
pulled towards the frozen `pretrain` encoder's features of each code grid's own image. DVC
deps are static, so `pretrain` and the prepared images are declared deps whatever the weight
(the tokenizer already depends on both, so this adds no re-runs a tokenizer change would not
cause); with alignment off they are left out of the checkpoint fingerprint and the lineage,
and the prior's bytes are those of a stage without alignment.
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
from genpipe.artifacts.encoder import load_ssl_encoder
from genpipe.artifacts.judges import load_judge
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import Params
from genpipe.data.prepared import load_split
from genpipe.data.raw import DataError
from genpipe.evaluation import class_consistency
from genpipe.generator import Generator
from genpipe.modelio import save_model
from genpipe.models.align import AlignedPrior, AlignHead, GridMismatch, ssl_targets
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace, PriorKind
from genpipe.outputs import write_json
from genpipe.runtime import to_device
from genpipe.spec import StageContext, StageSpec
from genpipe.training import History, batch_indices, fit

UNALIGNED_DEPS = (artifacts.CODES, artifacts.TOKENIZER, artifacts.JUDGES)
SPEC = StageSpec(
    "prior",
    params=("prepare", "tokenizer", "prior"),
    deps=(*UNALIGNED_DEPS, artifacts.PRETRAIN, artifacts.PREPARED),
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


def alignment_targets(
    params: Params, root: Path, train_y: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """The frozen SSL encoder's features (N, h*w, F) of the train images, in the codes' order
    (tokenize encodes data/prepared/train image by image), refused unless they fit."""
    images, labels = load_split("train", root / artifacts.PREPARED)
    if not torch.equal(labels, train_y):
        raise DataError(
            f"{artifacts.CODES}/train does not match {artifacts.PREPARED}/train image by image; "
            "re-run `dvc repro tokenize`"
        )
    encoder = load_ssl_encoder(params, root)
    try:
        return ssl_targets(encoder, images, grid)
    except GridMismatch as exc:
        raise DataError(
            f"{artifacts.SSL_ENCODER}: {exc}; re-run `dvc repro pretrain` with this tokenizer's "
            "params, or set prior.align_weight: 0"
        ) from None


def with_alignment(params: Params, model: nn.Module, targets: torch.Tensor | None) -> nn.Module:
    """`model` with its training-only alignment head when `targets` are given, else itself."""
    if targets is None:
        return model
    cfg = params.prior
    head = AlignHead(cfg.dim, targets.shape[-1], seed=params.base.seed)
    return AlignedPrior(model, head.to(targets.device), cfg.align_depth)


def train(
    params: Params,
    kind: PriorKind,
    model: nn.Module,
    settings: dict[str, Any] | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    ctx: StageContext,
    on_step: Callable[[int, nn.Module], None] | None = None,
    align_targets: torch.Tensor | None = None,
) -> tuple[nn.Module, History]:
    """Train `model` from scratch or resume `ctx.checkpoint`; returns the (EMA) weights in eval
    mode and the loss curve. With `align_targets` (N, h*w, F), the SSL features of x_train's
    images, the loss adds prior.align_weight x the alignment loss (REPA) and the returned net
    comes without its head; `on_step` then sees the net with its head (AlignedPrior)."""
    cfg = params.prior
    trained = with_alignment(params, model, align_targets)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        idx = batch_indices(len(x_train), cfg.optim.batch_size, params.base.seed, step)
        idx = ctx.world.shard(idx).to(ctx.device)
        x, y = x_train[idx], y_train[idx]
        if align_targets is None:
            return kind.loss(model, settings, x, y, ctx.generator), {}
        assert isinstance(trained, AlignedPrior)
        with trained.capture() as hidden:
            loss = kind.loss(model, settings, x, y, ctx.generator)
        align = trained.align_loss(hidden, align_targets[idx])
        total = loss + cfg.align_weight * align
        return total, {"prior_loss": loss.detach(), "align_loss": align.detach()}

    final, history = fit(
        trained,
        cfg.train_optim,
        loss_fn,
        ctx.checkpoint,
        f"prior ({cfg.kind})",
        generators=(ctx.generator,),
        log_lr=True,
        compile=ctx.compile,
        on_step=on_step,
        world=ctx.world,
    )
    return (final.net if isinstance(final, AlignedPrior) else final), history


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
    aligned = cfg.align_weight > 0
    deps = SPEC.deps if aligned else UNALIGNED_DEPS
    targets = alignment_targets(params, root, train_y, grid) if aligned else None
    ctx = SPEC.start(params, root, cfg.optim.checkpoint_every, deps)
    device = ctx.device
    space = CodeSpace(tokenizer.codebook_size, grid, tokenizer.latent_dim, num_classes)
    arch = kind.from_params(cfg, space)
    settings = kind.settings(cfg)
    sampling = {**kind.sampling(cfg), **kind.calibrate(tokenizer, train_codes)}
    x_train = to_device(kind.inputs(tokenizer, train_codes, sampling), device)
    y_train = to_device(train_y, device)
    x_val = kind.inputs(tokenizer, val_codes, sampling).to(device)
    model = kind.build(arch).to(device)
    if targets is not None:
        targets = to_device(targets, device)
    if not ctx.world.is_main:  # other torchrun ranks train alongside rank 0, which writes
        train(params, kind, model, settings, x_train, y_train, ctx, None, targets)
        return {}

    with SPEC.record(params, root, deps) as (run, (out, metrics_path, plots)):
        t0 = time.perf_counter()
        final, history = train(params, kind, model, settings, x_train, y_train, ctx, None, targets)
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
