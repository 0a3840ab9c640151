"""Stage `prior`: learn p(codes | class) over the tokenizer's codes, `ar` or `diffusion`.

`ar` trains the transformer on the code grids by next-code cross-entropy; `diffusion` trains
the denoiser on the codes' embeddings (standardised), and its samples are snapped back to the
nearest codes. Metrics: validation NLL (bits/code) or loss, sampling throughput, and the
share of samples the evaluator judge assigns to the requested class.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genpipe import viz
from genpipe.config import Params
from genpipe.data.raw import DataError
from genpipe.evaluation import class_consistency
from genpipe.generator import Generator, build_prior
from genpipe.modelio import save_model
from genpipe.models import diffusion
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.stages.judges import OUT as JUDGES
from genpipe.stages.judges import load_judge
from genpipe.stages.tokenize import CODES, load_codes
from genpipe.stages.tokenizer import OUT as TOKENIZER
from genpipe.stages.tokenizer import load_tokenizer
from genpipe.tracking import write as tracking
from genpipe.training import EMA, autocast, batch_indices, make_optimizer, steps

OUT = Path("models/prior")
METRICS = Path("metrics/prior.json")
PLOTS = Path("plots/prior")
LOG_EVERY = 25


def arch(
    params: Params, codebook_size: int, grid: tuple[int, int], latent_dim: int, num_classes: int
) -> dict[str, Any]:
    cfg = params.prior
    if cfg.kind == "ar":
        return {
            "vocab_size": codebook_size,
            "grid": grid,
            "num_classes": num_classes,
            "dim": cfg.dim,
            "depth": cfg.depth,
            "heads": cfg.heads,
            "dropout": cfg.dropout,
            "class_dropout": cfg.class_dropout,
            "pos": cfg.pos,
        }
    return {
        "latent_dim": latent_dim,
        "grid": grid,
        "num_classes": num_classes,
        "dim": cfg.dim,
        "depth": cfg.depth,
        "heads": cfg.heads,
        "class_dropout": cfg.class_dropout,
    }


def sampling(params: Params) -> dict[str, Any]:
    cfg = params.prior
    if cfg.kind == "ar":
        return {
            "cfg_scale": cfg.cfg_scale,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
        }
    return {
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler,
        "steps": cfg.sampling_steps,
        "eta": cfg.eta,
    }


def formulation(params: Params) -> dict[str, Any] | None:
    cfg = params.prior
    if cfg.kind != "diffusion":
        return None
    return {
        "name": cfg.formulation,
        **({"prediction": cfg.prediction} if cfg.formulation == "ddpm" else {}),
    }


def check_codes(card: dict[str, Any], codebook_size: int, grid: tuple[int, int]) -> None:
    """Refuse codes made by another tokenizer before any training."""
    if card["codebook_size"] != codebook_size or tuple(card["grid"]) != grid:
        raise DataError(
            f"{CODES}/card.json: codes have codebook {card['codebook_size']} and grid "
            f"{card['grid']}, but the tokenizer has {codebook_size} and {list(grid)}; "
            "re-run `dvc repro tokenize`"
        )


def train(
    params: Params,
    model: nn.Module,
    form: diffusion.Formulation | None,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    ctx: common.StageContext,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train `model` from scratch or resume `ctx.checkpoint`; returns the (EMA) weights in eval
    mode and the loss curve."""
    cfg, opt_cfg = params.prior, params.prior.optim
    device, g = ctx.device, ctx.generator
    opt, sched = make_optimizer(
        model, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    ema = EMA(model, opt_cfg.ema_decay) if opt_cfg.ema_decay > 0 else None
    history: list[dict[str, float]] = []
    start = 0
    if (state := ctx.checkpoint.load()) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        g.set_state(state["generator"])
        history, start = state["history"], state["step"]
    step_fn: nn.Module = torch.compile(model) if cfg.compile and device.type == "cuda" else model

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if form is not None:
            return form.loss(step_fn, x, y, g)  # type: ignore[arg-type]
        logits = step_fn(x, y, model.drop_labels(y, g))  # type: ignore[operator]
        return F.cross_entropy(logits.flatten(0, 1).float(), x.flatten())

    model.train()
    for step in steps(start, opt_cfg.steps, f"prior ({cfg.kind})"):
        idx = batch_indices(len(x_train), opt_cfg.batch_size, params.base.seed, step).to(device)
        with autocast(device):
            loss = loss_of(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        if step % LOG_EVERY == 0 or step == opt_cfg.steps - 1:
            history.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
        ctx.checkpoint.maybe_save(
            step,
            opt_cfg.steps,
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "generator": g.get_state(),
                "history": history,
            },
        )
    return (ema.model if ema is not None else model).eval(), history


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.prior
    deps = [CODES, TOKENIZER, JUDGES]
    sections = ("prepare", "tokenizer", "prior")
    tokenizer = load_tokenizer(root / TOKENIZER / "model.pt", params)
    grid = tokenizer.grid(params.prepare.image_size)
    train_codes, train_y, card = load_codes("train", root / CODES)
    val_codes, val_y, _ = load_codes("val", root / CODES)
    check_codes(card, tokenizer.codebook_size, grid)
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    ctx = common.start("prior", params, sections, deps, root, cfg.optim.checkpoint_every)
    device = ctx.device
    model_arch = arch(params, tokenizer.codebook_size, grid, tokenizer.latent_dim, num_classes)
    form = diffusion.make_formulation(**formulation(params)) if cfg.kind == "diffusion" else None
    sample_cfg = sampling(params)

    with torch.no_grad():
        latents = tokenizer.codes_to_latent(train_codes) if form else None
    if latents is not None:
        sample_cfg["latent_shift"], sample_cfg["latent_scale"] = (
            float(latents.mean()),
            float(latents.std()),
        )

    def prepare_x(codes: torch.Tensor) -> torch.Tensor:
        if form is None:
            return codes
        with torch.no_grad():
            lat = tokenizer.codes_to_latent(codes)
        return (lat - sample_cfg["latent_shift"]) / sample_cfg["latent_scale"]

    x_train, x_val = prepare_x(train_codes).to(device), prepare_x(val_codes).to(device)
    model = build_prior(cfg.kind, model_arch).to(device)

    with (
        tracking.stage_run(
            "prior", params, sections, deps, root, outs=[OUT, METRICS, PLOTS]
        ) as run,
        staged(root / OUT, root / METRICS, root / PLOTS) as (out, metrics_path, plots),
    ):
        t0 = time.perf_counter()
        final, history = train(params, model, form, x_train, train_y.to(device), ctx)
        train_seconds = time.perf_counter() - t0
        metrics = validate(final, form, x_val, val_y.to(device), params.base.seed)
        gen = Generator(tokenizer.to(device), final, cfg.kind, sample_cfg, formulation(params))
        labels = torch.arange(num_classes, device=device).repeat_interleave(cfg.samples_per_class)
        t0 = time.perf_counter()
        images = gen(labels, torch.Generator(device).manual_seed(params.base.seed)).cpu()
        sample_seconds = time.perf_counter() - t0
        metrics["class_consistency"] = class_consistency(evaluator, images, labels.cpu())
        timing = {"train_seconds": train_seconds, "images_per_second": len(images) / sample_seconds}
        save_model(
            out / "prior.pt",
            "prior",
            model_arch,
            final.cpu(),
            prior_kind=cfg.kind,
            sampling=sample_cfg,
            formulation=formulation(params),
        )
        write_json(metrics_path, {"kind": cfg.kind, **metrics})
        common.write_curve(history, plots / "loss.csv")
        grid_img = viz.class_grid(images, cfg.samples_per_class, num_classes)
        viz.save_png(grid_img, plots / "samples.png")
        run.log_image(grid_img, "samples.png")
        run.log_metrics({**metrics, **timing})
        run.log_history(history)
        run.write_meta(out)
    ctx.checkpoint.clear()
    return metrics


@torch.no_grad()
def validate(
    model: nn.Module,
    form: diffusion.Formulation | None,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    seed: int,
) -> dict[str, float]:
    """AR: NLL in bits per code; diffusion: the training loss at fixed noise draws."""
    if form is None:
        return {"val_nll_bits_per_code": model.nll_bits_per_code(x_val, y_val)}  # type: ignore[operator]
    g = torch.Generator(x_val.device).manual_seed(seed + 1)
    losses = [float(form.loss(model, x_val, y_val, g)) for _ in range(8)]  # type: ignore[arg-type]
    return {"val_loss": sum(losses) / len(losses)}
