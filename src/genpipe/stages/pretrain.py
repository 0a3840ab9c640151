"""Stage `pretrain`: self-supervised pretraining of the tokenizer's encoder (SimCLR or MAE),
then linear and k-NN probes on frozen features of (a) the pretrained encoder, (b) the same
encoder at random initialisation, (c) raw pixels, side by side, and a 2-D feature map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from genpipe import artifacts, probes, viz
from genpipe.artifacts.encoder import encoder_arch
from genpipe.config import Params
from genpipe.data.prepared import load_split
from genpipe.evaluation import batched
from genpipe.modelio import save_model
from genpipe.models.autoencoder import Encoder
from genpipe.models.ssl import MAE, SimCLR, encoder_features, simclr_augment
from genpipe.outputs import write_json
from genpipe.runtime import to_device
from genpipe.spec import StageContext, StageSpec
from genpipe.training import History, batch_indices, fit

SPEC = StageSpec(
    "pretrain",
    params=(
        "prepare",
        "pretrain",
        "tokenizer.channels",
        "tokenizer.num_res_blocks",
        "tokenizer.embed_dim",
    ),
    deps=(artifacts.PREPARED,),
    outs=(artifacts.PRETRAIN,),
    metrics=artifacts.metrics("pretrain"),
    plots=artifacts.plots("pretrain"),
)


def build_objective(params: Params, encoder: Encoder) -> nn.Module:
    cfg = params.pretrain
    dim = params.tokenizer.embed_dim
    if cfg.method == "simclr":
        return SimCLR(encoder, dim, proj_dim=cfg.proj_dim, temperature=cfg.temperature)
    return MAE(encoder, dim, params.prepare.channels, cfg.patch_size, cfg.mask_ratio)


def train(
    params: Params, x_train: torch.Tensor, ctx: StageContext, on_step=None
) -> tuple[Encoder, History]:
    """Train from scratch or resume `ctx.checkpoint`; returns the (EMA) encoder and the curve.
    Under torchrun the views are drawn for the whole global batch (the same on every rank)
    before each rank takes its shard, and SimCLR's negatives span the global batch."""
    cfg, opt_cfg = params.pretrain, params.pretrain.optim
    device, g, world = ctx.device, ctx.generator, ctx.world
    encoder = Encoder(**encoder_arch(params))
    objective = build_objective(params, encoder).to(device)
    if isinstance(objective, SimCLR):
        objective.gather = world.gather_rows
    augment_g = torch.Generator().manual_seed(params.base.seed + 7)
    augment = simclr_augment(
        augment_g,
        scale=tuple(cfg.crop_scale),
        degrees=cfg.degrees,
        translate=cfg.translate,
        noise_std=cfg.noise_std,
    )
    x_all = to_device(x_train, device)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = batch_indices(len(x_all), opt_cfg.batch_size, params.base.seed, step)
        x = x_all[idx.to(device)]
        if cfg.method == "simclr":
            return objective(world.shard(augment(x)), world.shard(augment(x))), {}
        return objective(world.shard(x), g), {}

    final, history = fit(
        objective,
        opt_cfg,
        loss_fn,
        ctx.checkpoint,
        f"pretrain ({cfg.method})",
        generators=(g,),
        shared=(augment_g,),
        on_step=on_step,
        world=world,
        compile=ctx.compile,
    )
    return final.encoder.eval(), history  # type: ignore[return-value]


@torch.no_grad()
def _features(encoder: nn.Module | None, x: torch.Tensor) -> Any:
    if encoder is None:
        return x.flatten(1).numpy()
    return batched(lambda b: encoder_features(encoder, b), x).numpy()


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
    ctx = SPEC.start(params, root, cfg.optim.checkpoint_every)
    prepared = root / artifacts.PREPARED
    train_xy, test_xy = load_split("train", prepared), load_split("test", prepared)
    if not ctx.world.is_main:  # other torchrun ranks train alongside rank 0, which writes
        train(params, train_xy[0], ctx)
        return {}
    with SPEC.record(params, root) as (run, (out, metrics_path, plots)):
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
        viz.write_curve(history, plots / "loss.csv")
        fig = projection_figure(encoder, *test_xy, params.base.seed)
        fig.savefig(plots / "features_pca.png", metadata={"Software": None})
        run.log_figure(fig, "features_pca.png")
        run.log_metrics(metrics)
        run.log_history(history)
    ctx.checkpoint.clear()
    return metrics
