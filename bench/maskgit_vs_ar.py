"""MaskGIT vs AR prior on the real codes of a run: the same architecture, optimiser, schedule,
steps and data for both, then validation NLL (AR: exact; MaskGIT: its order-agnostic upper
bound), and the `evaluate` stage's sample metrics in the evaluator judge's features (FID
against the test split and its ratio to the train-subset floor, precision/recall, class
consistency, diversity) on `evaluate.samples_per_class` samples per class.

    python bench/maskgit_vs_ar.py [--root .] [--steps N] [--maskgit-steps 8 12]
        [--choice-temperatures 4.5 1.0] [--cfg-scales 2.0] [--kinds ar maskgit]

Needs the outputs of `genpipe stage prepare` .. `tokenize` and `judges` under --root; the
prior settings come from its params.yaml (`prior`), so this is the `prior` stage's recipe with
only the model swapped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from genpipe import evaluation
from genpipe.artifacts.codes import load_codes
from genpipe.artifacts.judges import load_judge
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import load_params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.evaluation import floor_sample
from genpipe.models.priors import prior_kind
from genpipe.models.priors.ar import ARPrior
from genpipe.models.priors.maskgit import MaskGITPrior
from genpipe.training import EMA, batch_indices, make_optimizer


def train(model: nn.Module, codes, labels, optim, seed: int) -> tuple[nn.Module, float]:
    """The prior stage's loop (AdamW, warm-up + cosine, grad clip, EMA); each model's own loss."""
    opt, sched = make_optimizer(
        model, optim.lr, optim.weight_decay, optim.warmup_steps, optim.steps
    )
    ema = EMA(model, optim.ema_decay)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(optim.steps):
        idx = batch_indices(len(codes), optim.batch_size, seed, step)
        loss = model.loss(codes[idx], labels[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
    return ema.model.eval(), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=None, help="default: the kind's prior steps")
    parser.add_argument("--maskgit-steps", type=int, nargs="+", default=[8, 12])
    parser.add_argument("--choice-temperatures", type=float, nargs="+", default=[4.5, 1.0])
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=None, help="MaskGIT's")
    parser.add_argument("--kinds", nargs="+", choices=("ar", "maskgit"), default=["ar", "maskgit"])
    args = parser.parse_args()
    params = load_params(args.root / "params.yaml")
    cfg, seed = params.prior, params.base.seed
    optim = cfg.optim.model_copy(update={"steps": args.steps or cfg.train_steps})
    tokenizer = load_tokenizer(args.root / "models/tokenizer/model.pt")
    train_codes, train_y, card = load_codes("train", args.root / "data/codes")
    val_codes, val_y, _ = load_codes("val", args.root / "data/codes")
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(args.root, "evaluator", num_classes)
    grid = tuple(card["grid"])
    arch = dict(
        vocab_size=card["codebook_size"],
        grid=grid,
        num_classes=num_classes,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        dropout=cfg.dropout,
        class_dropout=cfg.class_dropout,
        pos=cfg.pos,
    )
    ar_scale, maskgit_scale = prior_kind("ar").guidance(cfg), prior_kind("maskgit").guidance(cfg)
    sampling = dict(cfg_scale=ar_scale, temperature=cfg.temperature, top_p=cfg.top_p)
    per_class = params.evaluate.samples_per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    test_x, _ = load_split("test", args.root / PREPARED)
    val_x, val_y = load_split("val", args.root / PREPARED)
    floor_x, _ = floor_sample(val_x, val_y, per_class, seed)  # evaluate's floor images
    extractor = evaluation.FeatureExtractor(evaluator)
    floor = evaluation.fid(extractor, test_x, floor_x)
    real_f = evaluation.features(extractor, test_x)
    print(f"codes {grid}, K={card['codebook_size']}, {len(train_codes)} train; arch {arch}")
    print(
        f"optim steps {optim.steps}, batch {optim.batch_size}, lr {optim.lr}; sampling {sampling}"
    )
    priors = {"ar": ARPrior, "maskgit": MaskGITPrior}
    for name, cls in ((k, priors[k]) for k in args.kinds):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        model, last = train(cls(**arch), train_codes, train_y, optim, seed)
        seconds = time.perf_counter() - t0
        nll = model.nll_bits_per_code(val_codes, val_y)
        runs = [{}]
        if name == "maskgit":
            runs = [
                {"steps": t, "choice_temperature": c, "cfg_scale": s}
                for t in args.maskgit_steps
                for c in args.choice_temperatures
                for s in args.cfg_scales or [maskgit_scale]
            ]
        for extra in runs:
            g = torch.Generator().manual_seed(seed)
            t0 = time.perf_counter()
            codes = model.sample(labels, g, **{**sampling, **extra})
            sample_seconds = time.perf_counter() - t0
            with torch.no_grad():
                images = tokenizer.decode_codes(codes)
            fake_f = evaluation.features(extractor, images)
            pr = evaluation.precision_recall(real_f, fake_f, params.evaluate.knn_k)
            fid = evaluation.fid(extractor, test_x, images)
            print(
                f"{name} {extra or ''}: train {seconds:.0f} s (last loss {last:.3f}), val NLL "
                f"{nll:.3f} bits/code{' (upper bound)' if name == 'maskgit' else ''}; "
                f"{len(labels)} samples: consistency "
                f"{evaluation.class_consistency(evaluator, images, labels):.3f}, FID {fid:.2f} "
                f"(ratio {fid / floor:.2f} to floor {floor:.2f}), precision "
                f"{pr['precision']:.3f}, recall {pr['recall']:.3f}, diversity "
                f"{evaluation.mean_pairwise_distance(fake_f):.3f}; "
                f"sampling {len(labels) / sample_seconds:,.0f} samples/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
