"""Stage `tokenizer`: train the VQ autoencoder on the train split; report reconstruction
quality and codebook use on val and test; write the model file and reconstruction grids."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe import viz
from genpipe.config import Params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.modelio import load_model, save_model
from genpipe.models.autoencoder import Encoder
from genpipe.models.discriminator import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
)
from genpipe.models.tokenizer import VQAutoencoder
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.tracking import write as tracking
from genpipe.training import EMA, autocast, batch_indices, make_optimizer, steps

OUT = Path("models/tokenizer")
METRICS = Path("metrics/tokenizer.json")
PLOTS = Path("plots/tokenizer")
SSL_ENCODER = Path("models/pretrain/encoder.pt")
LOG_EVERY = 25


def build(params: Params) -> VQAutoencoder:
    return VQAutoencoder(**params.tokenizer.arch(params.prepare.channels))


def load_tokenizer(path: Path, params: Params | None = None) -> VQAutoencoder:
    """The trained tokenizer; with `params`, refuse a file made for another architecture."""
    expect = params.tokenizer.arch(params.prepare.channels) if params else None
    model, _ = load_model(path, "tokenizer", VQAutoencoder, expect)
    assert isinstance(model, VQAutoencoder)
    return model


def load_ssl_encoder(params: Params, root: Path) -> nn.Module:
    """The `pretrain` encoder, refused unless its architecture is this tokenizer's encoder."""
    cfg = params.tokenizer
    expect = {
        "in_channels": params.prepare.channels,
        "channels": tuple(cfg.channels),
        "num_res_blocks": cfg.num_res_blocks,
        "out_dim": cfg.embed_dim,
    }
    encoder, _ = load_model(root / SSL_ENCODER, "ssl_encoder", Encoder, expect)
    return encoder


def train(
    params: Params,
    train_x: torch.Tensor,
    ctx: common.StageContext,
    ssl_encoder: nn.Module | None = None,
    on_step: Callable[[int, VQAutoencoder], None] | None = None,
) -> tuple[VQAutoencoder, list[dict[str, float]]]:
    """Train from scratch or resume `ctx.checkpoint`; returns the (EMA) model and the curve.
    `on_step(step, model)` runs after each step (interrupt tests, learning-speed benchmarks)."""
    cfg, opt_cfg = params.tokenizer, params.tokenizer.optim
    device, world = ctx.device, ctx.world
    model = build(params).to(device)
    if world.size > 1 and hasattr(model.quantizer, "reduce"):
        # codebook statistics summed over ranks; (re)initialised codes taken from rank 0
        model.quantizer.reduce = world.all_reduce_sum
        model.quantizer.broadcast = world.broadcast
    if cfg.init_from_ssl and ssl_encoder is not None:
        model.encoder.load_state_dict(ssl_encoder.state_dict())
    perceptual = PerceptualLoss(ssl_encoder).to(device) if cfg.perceptual_weight > 0 else None
    disc = PatchDiscriminator(params.prepare.channels, num_layers=cfg.disc_layers).to(device)
    opt, sched = make_optimizer(
        model, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    d_opt, d_sched = make_optimizer(
        disc, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    ema = EMA(model, opt_cfg.ema_decay) if opt_cfg.ema_decay > 0 else None
    history: list[dict[str, float]] = []
    start = 0
    if (state := ctx.checkpoint.load()) is not None:
        model.load_state_dict(state["model"])
        disc.load_state_dict(state["disc"])
        opt.load_state_dict(state["opt"])
        d_opt.load_state_dict(state["d_opt"])
        sched.load_state_dict(state["sched"])
        d_sched.load_state_dict(state["d_sched"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        history, start = state["history"], state["step"]

    rec_fn = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
    use_gan = cfg.disc_weight > 0
    x_all = train_x.to(device)
    net = world.wrap(model, device)  # DDP averages gradients across ranks
    model.train()
    for step in steps(start, opt_cfg.steps, "tokenizer"):
        idx = batch_indices(len(x_all), opt_cfg.batch_size, params.base.seed, step)
        x = x_all[world.shard(idx).to(device)]
        with autocast(device):
            x_hat, codes, q_loss, stats = net(x)
            rec = rec_fn(x_hat.float(), x)
            if perceptual is not None:
                rec = rec + cfg.perceptual_weight * perceptual(x_hat, x)
            loss = rec + q_loss
            gan_on = use_gan and step >= cfg.disc_start
            if gan_on:
                g_loss = hinge_g_loss(disc(x_hat))
                weight = adaptive_weight(rec, g_loss, model.decoder.last_layer, cfg.disc_max_weight)
                loss = loss + cfg.disc_weight * weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        opt.step()
        sched.step()
        if gan_on:
            with autocast(device):
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            d_sched.step()
        if ema is not None:
            ema.update(model)
        if step % LOG_EVERY == 0 or step == opt_cfg.steps - 1:
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "recon": rec.item(),
                    "quant": q_loss.item(),
                    "perplexity": float(stats["perplexity"]),
                }
            )
        ctx.checkpoint.maybe_save(
            step,
            opt_cfg.steps,
            {
                "model": model.state_dict(),
                "disc": disc.state_dict(),
                "opt": opt.state_dict(),
                "d_opt": d_opt.state_dict(),
                "sched": sched.state_dict(),
                "d_sched": d_sched.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "rng": torch.get_rng_state(),
                "history": history,
            },
        )
        if on_step is not None:
            on_step(step, model)
    final = ema.model if ema is not None else model
    return final.eval(), history  # type: ignore[return-value]


@torch.no_grad()
def evaluate(model: VQAutoencoder, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """MSE/PSNR over the whole split; usage and perplexity of the codes over the whole split."""
    model = model.to(device).eval()
    codes = common.batched(lambda b: model.encode_codes(b.to(device)).cpu(), x)
    recon = common.batched(lambda c: model.decode_codes(c.to(device)).cpu(), codes)
    mse = float(F.mse_loss(recon.float(), x))
    counts = torch.bincount(codes.flatten(), minlength=model.codebook_size).double()
    probs = counts / counts.sum()
    entropy = float(-(probs[probs > 0] * probs[probs > 0].log()).sum())
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "codebook_usage": float((counts > 0).double().mean()),
        "perplexity": math.exp(entropy),
    }


def recon_grid(model: VQAutoencoder, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Any:
    """Two rows per class pair: originals above their reconstructions."""
    picks = torch.cat([torch.nonzero(y == c).flatten()[:1] for c in torch.unique(y)])[:16]
    originals = x[picks]
    with torch.no_grad():
        recon = model.decode_codes(model.encode_codes(originals.to(device))).cpu()
    return viz.image_grid(torch.cat([originals, recon]), nrow=len(picks))


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.tokenizer
    deps = [PREPARED]
    needs_ssl = cfg.init_from_ssl or cfg.perceptual_weight > 0
    if needs_ssl:
        deps.append(SSL_ENCODER.parent)
    ctx = common.start(
        "tokenizer", params, ("prepare", "tokenizer"), deps, root, cfg.optim.checkpoint_every
    )
    train_x, _ = load_split("train", root / PREPARED)
    splits = {s: load_split(s, root / PREPARED) for s in ("val", "test")}
    ssl_encoder = load_ssl_encoder(params, root) if needs_ssl else None
    if not ctx.world.is_main:  # other torchrun ranks train alongside rank 0, which writes
        train(params, train_x, ctx, ssl_encoder)
        return {}

    with (
        tracking.stage_run(
            "tokenizer", params, ("prepare", "tokenizer"), deps, root, outs=[OUT, METRICS, PLOTS]
        ) as run,
        staged(root / OUT, root / METRICS, root / PLOTS) as (out, metrics_path, plots),
    ):
        model, history = train(params, train_x, ctx, ssl_encoder)
        metrics = {s: evaluate(model, x, ctx.device) for s, (x, _) in splits.items()}
        model = model.cpu()
        save_model(
            out / "model.pt",
            "tokenizer",
            cfg.arch(params.prepare.channels),
            model,
            grid=model.grid(params.prepare.image_size),
        )
        write_json(metrics_path, metrics)
        common.write_curve(history, plots / "loss.csv")
        for split, (x, y) in splits.items():
            grid = recon_grid(model, x, y, torch.device("cpu"))
            viz.save_png(grid, plots / f"recon_{split}.png")
            run.log_image(grid, f"recon_{split}.png")
        run.log_metrics(metrics)
        run.log_history(history)
        run.log_torch_model(model, "tokenizer", train_x[:2].numpy())
        run.write_meta(out)
    ctx.checkpoint.clear()
    return metrics
