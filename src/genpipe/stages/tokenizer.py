"""Stage `tokenizer`: train the VQ autoencoder on the train split; report reconstruction
quality and codebook use on val and test; write the model file and reconstruction grids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe import artifacts, viz
from genpipe.artifacts.encoder import load_ssl_encoder
from genpipe.artifacts.tokenizer import build_tokenizer, tokenizer_arch
from genpipe.config import Params
from genpipe.data.prepared import load_split
from genpipe.evaluation import batched, reconstruction
from genpipe.modelio import save_model
from genpipe.models.discriminator import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.outputs import write_json
from genpipe.runtime import autocast, to_device
from genpipe.spec import StageContext, StageSpec
from genpipe.training import History, batch_indices, fit, make_optimizer

SPEC = StageSpec(
    "tokenizer",
    params=("prepare", "tokenizer"),
    deps=(artifacts.PREPARED, artifacts.PRETRAIN),
    outs=(artifacts.TOKENIZER,),
    metrics=artifacts.metrics("tokenizer"),
    plots=artifacts.plots("tokenizer"),
)


def train(
    params: Params,
    train_x: torch.Tensor,
    ctx: StageContext,
    ssl_encoder: nn.Module | None = None,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> tuple[VQAutoencoder, History]:
    """Train from scratch or resume `ctx.checkpoint`; returns the (EMA) model and the curve.
    `on_step(step, model)` runs after each step (interrupt tests, learning-speed benchmarks)."""
    cfg, opt_cfg = params.tokenizer, params.tokenizer.optim
    device, world = ctx.device, ctx.world
    model = build_tokenizer(params).to(device)
    if world.size > 1 and hasattr(model.quantizer, "reduce"):
        # codebook statistics summed over ranks; (re)initialised codes taken from rank 0
        model.quantizer.reduce = world.all_reduce_sum
        model.quantizer.broadcast = world.broadcast
    if cfg.init_from_ssl and ssl_encoder is not None:
        model.encoder.load_state_dict(ssl_encoder.state_dict())
    perceptual = PerceptualLoss(ssl_encoder).to(device) if cfg.perceptual_weight > 0 else None
    disc = PatchDiscriminator(params.prepare.channels, num_layers=cfg.disc_layers).to(device)
    d_opt, d_sched = make_optimizer(
        disc, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    rec_fn = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
    use_gan = cfg.disc_weight > 0
    x_all = to_device(train_x, device)
    batch: dict[str, torch.Tensor] = {}  # this step's images, for the discriminator update

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = batch_indices(len(x_all), opt_cfg.batch_size, params.base.seed, step)
        x = x_all[world.shard(idx).to(device)]
        x_hat, codes, q_loss, stats = model(x)
        rec = rec_fn(x_hat.float(), x)
        if perceptual is not None:
            rec = rec + cfg.perceptual_weight * perceptual(x_hat, x)
        loss = rec + q_loss
        if use_gan and step >= cfg.disc_start:
            g_loss = hinge_g_loss(disc(x_hat))
            weight = adaptive_weight(rec, g_loss, model.decoder.last_layer, cfg.disc_max_weight)
            loss = loss + cfg.disc_weight * weight * g_loss
            batch.update(x=x, x_hat=x_hat)
        logs = {"recon": rec, "quant": q_loss, "perplexity": stats["perplexity"]}
        return loss, logs

    def discriminator_step(step: int) -> None:
        if not batch:
            return
        with autocast(device):
            d_loss = hinge_d_loss(disc(batch["x"]), disc(batch["x_hat"].detach()))
        batch.clear()
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        world.average_gradients(disc)
        d_opt.step()
        d_sched.step()

    final, history = fit(
        model,
        opt_cfg,
        loss_fn,
        ctx.checkpoint,
        "tokenizer",
        parts={"disc": disc, "d_opt": d_opt, "d_sched": d_sched},
        after_step=discriminator_step,
        on_step=on_step,
        world=world,
        compile=ctx.compile,
    )
    return final, history  # type: ignore[return-value]


@torch.no_grad()
def codebook_usage(model: VQAutoencoder, x: torch.Tensor) -> list[dict[str, float]]:
    """How often each code is used on `x`, most used first (rank 0): a long flat tail of
    zeros is dead codes, a few towering codes is a collapsed codebook."""
    codes = batched(lambda b: model.encode_codes(b), x)
    counts = torch.bincount(codes.flatten(), minlength=model.codebook_size)
    order = torch.argsort(counts, descending=True, stable=True)
    return [
        {"rank": rank, "code": int(code), "count": int(counts[code])}
        for rank, code in enumerate(order.tolist())
    ]


def recon_grid(model: VQAutoencoder, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Any:
    """Two rows per class pair: originals above their reconstructions."""
    picks = torch.cat([torch.nonzero(y == c).flatten()[:1] for c in torch.unique(y)])[:16]
    originals = x[picks]
    with torch.no_grad():
        recon = model.decode_codes(model.encode_codes(originals.to(device))).cpu()
    grid = viz.image_grid(torch.cat([originals, recon]), nrow=len(picks))
    return viz.label_rows(grid, ["real", "recon"])


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.tokenizer
    needs_ssl = cfg.init_from_ssl or cfg.perceptual_weight > 0
    deps = SPEC.deps if needs_ssl else (artifacts.PREPARED,)
    ctx = SPEC.start(params, root, cfg.optim.checkpoint_every, deps)
    train_x, _ = load_split("train", root / artifacts.PREPARED)
    splits = {s: load_split(s, root / artifacts.PREPARED) for s in ("val", "test")}
    ssl_encoder = load_ssl_encoder(params, root) if needs_ssl else None
    if not ctx.world.is_main:  # other torchrun ranks train alongside rank 0, which writes
        train(params, train_x, ctx, ssl_encoder)
        return {}

    with SPEC.record(params, root, deps) as (run, (out, metrics_path, plots)):
        model, history = train(params, train_x, ctx, ssl_encoder)
        metrics = {s: reconstruction(model, x, ctx.device) for s, (x, _) in splits.items()}
        model = model.cpu()
        save_model(
            out / "model.pt",
            "tokenizer",
            tokenizer_arch(params),
            model,
            grid=model.grid(params.prepare.image_size),
        )
        write_json(metrics_path, metrics)
        viz.write_curve(history, plots / "loss.csv")
        viz.write_curve(codebook_usage(model, splits["test"][0]), plots / "codebook_usage.csv")
        for split, (x, y) in splits.items():
            grid = recon_grid(model, x, y, torch.device("cpu"))
            viz.save_png(grid, plots / f"recon_{split}.png")
            run.log_image(grid, f"recon_{split}.png")
        run.log_metrics(metrics)
        run.log_history(history)
        run.log_torch_model(model, "tokenizer", train_x[:2].numpy())
    ctx.checkpoint.clear()
    return metrics
