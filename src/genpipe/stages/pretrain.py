"""Stage `pretrain`: self-supervised pretraining of the tokenizer's encoder (SimCLR or MAE),
then linear and k-NN probes on frozen features of (a) the pretrained encoder, (b) the same
encoder at random initialisation, (c) raw pixels, side by side, and a 2-D feature map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from genpipe import probes
from genpipe.config import Params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.modelio import save_model
from genpipe.models.autoencoder import Encoder
from genpipe.models.ssl import MAE, SimCLR, encoder_features, simclr_augment
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.tracking import write as tracking
from genpipe.training import autocast, batch_indices, make_optimizer, steps

OUT = Path("models/pretrain")
METRICS = Path("metrics/pretrain.json")
PLOTS = Path("plots/pretrain")


def encoder_arch(params: Params) -> dict[str, Any]:
    """The tokenizer's encoder, so the result can initialise it or serve as its feature net."""
    t = params.tokenizer
    return {
        "in_channels": params.prepare.channels,
        "channels": tuple(t.channels),
        "num_res_blocks": t.num_res_blocks,
        "out_dim": t.embed_dim,
    }


def build_objective(params: Params, encoder: Encoder) -> nn.Module:
    cfg = params.pretrain
    dim = params.tokenizer.embed_dim
    if cfg.method == "simclr":
        return SimCLR(encoder, dim, proj_dim=cfg.proj_dim, temperature=cfg.temperature)
    return MAE(encoder, dim, params.prepare.channels, cfg.patch_size, cfg.mask_ratio)


def train(
    params: Params, x_train: torch.Tensor, ctx: common.StageContext
) -> tuple[Encoder, list[dict[str, float]]]:
    cfg, opt_cfg = params.pretrain, params.pretrain.optim
    device, g = ctx.device, ctx.generator
    encoder = Encoder(**encoder_arch(params))
    objective = build_objective(params, encoder).to(device)
    augment = simclr_augment(
        torch.Generator().manual_seed(params.base.seed + 7),
        scale=tuple(cfg.crop_scale),
        degrees=cfg.degrees,
        translate=cfg.translate,
        noise_std=cfg.noise_std,
    )
    opt, sched = make_optimizer(
        objective, opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.warmup_steps, opt_cfg.steps
    )
    x_all = x_train.to(device)
    history = []
    objective.train()
    for step in steps(0, opt_cfg.steps, f"pretrain ({cfg.method})"):
        x = x_all[batch_indices(len(x_all), opt_cfg.batch_size, params.base.seed, step).to(device)]
        with autocast(device):
            views = (augment(x), augment(x)) if cfg.method == "simclr" else (x, g)
            loss = objective(*views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(objective.parameters(), opt_cfg.grad_clip)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == opt_cfg.steps - 1:
            history.append({"step": step, "loss": loss.item()})
    return encoder.eval(), history


@torch.no_grad()
def _features(encoder: nn.Module | None, x: torch.Tensor) -> Any:
    if encoder is None:
        return x.flatten(1).numpy()
    return common.batched(lambda b: encoder_features(encoder, b), x).numpy()


def probe_all(
    encoders: dict[str, nn.Module | None],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    out = {}
    for name, enc in encoders.items():
        tr, te = _features(enc, train[0]), _features(enc, test[0])
        out[name] = {
            "linear_probe": probes.linear_probe(
                tr, train[1].numpy(), te, test[1].numpy(), seed=seed
            ),
            "knn_probe": probes.knn_probe(tr, train[1].numpy(), te, test[1].numpy(), k=k),
        }
    return out


def projection_figure(encoder: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> Any:
    xy = probes.project_2d(_features(encoder, x), "pca", seed)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    points = ax.scatter(xy[:, 0], xy[:, 1], c=y.numpy(), cmap="tab10", s=6)
    ax.legend(*points.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_title("SSL encoder features (test split, PCA)")
    fig.tight_layout()
    return fig


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.pretrain
    deps = [PREPARED]
    sections = ("prepare", "pretrain", "tokenizer")
    ctx = common.start("pretrain", params, sections, deps, root, 0)
    train_xy, test_xy = load_split("train", root / PREPARED), load_split("test", root / PREPARED)
    with (
        tracking.stage_run(
            "pretrain", params, sections, deps, root, outs=[OUT, METRICS, PLOTS]
        ) as run,
        staged(root / OUT, root / METRICS, root / PLOTS) as (out, metrics_path, plots),
    ):
        encoder, history = train(params, train_xy[0], ctx)
        encoder = encoder.cpu()
        torch.manual_seed(params.base.seed)
        random_init = Encoder(**encoder_arch(params)).eval()
        metrics = probe_all(
            {"ssl": encoder, "random_init": random_init, "pixels": None},
            train_xy,
            test_xy,
            cfg.knn_k,
            params.base.seed,
        )
        metrics["ssl_gain_over_random"] = (
            metrics["ssl"]["linear_probe"] - metrics["random_init"]["linear_probe"]
        )
        save_model(
            out / "encoder.pt", "ssl_encoder", encoder_arch(params), encoder, method=cfg.method
        )
        write_json(metrics_path, metrics)
        common.write_curve(history, plots / "loss.csv")
        fig = projection_figure(encoder, *test_xy, params.base.seed)
        fig.savefig(plots / "features_pca.png", metadata={"Software": None})
        run.log_figure(fig, "features_pca.png")
        run.log_metrics(metrics)
        run.log_history(history)
        run.write_meta(out)
    return metrics
