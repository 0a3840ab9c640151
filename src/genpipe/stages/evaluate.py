"""Stage `evaluate`: score the base and the fine-tuned prior with the evaluator judge.

For each generator: N samples per class (seeded); FID in the evaluator's penultimate feature
space against the test split, with its floor (FID of as many real train images against the
same test split) and their ratio; k-NN precision/recall; class consistency; diversity
(mean pairwise feature distance, entropy of the codes); plus the tokenizer's reconstructions.
FID ratio, precision, recall and class consistency get 95% bootstrap intervals (`*_ci_low`,
`*_ci_high`; see genpipe.evaluation_intervals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genpipe import evaluation, evaluation_intervals, tracking, viz
from genpipe.config import Params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.generator import Generator, load_generator
from genpipe.models.classifier import Classifier
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.stages.judges import OUT as JUDGES
from genpipe.stages.judges import load_judge
from genpipe.stages.tokenizer import OUT as TOKENIZER
from genpipe.stages.tokenizer import evaluate as tokenizer_metrics

PRIORS = {"base": Path("models/prior"), "finetuned": Path("models/finetune")}
METRICS = Path("metrics/evaluate.json")
PLOTS = Path("plots/evaluate")


def generate(
    gen: Generator, per_class: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-ordered samples on the CPU: images, their requested labels and their codes."""
    device = next(gen.parameters()).device
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    codes = gen.sample_codes(labels.to(device), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = gen.tokenizer.decode_codes(codes)
    return images.cpu(), labels, codes.cpu()


def floor_sample(
    train_x: torch.Tensor, train_y: torch.Tensor, per_class: int, seed: int
) -> torch.Tensor:
    """As many real train images per class as generated, for the FID floor."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(train_y):
        idx = torch.nonzero(train_y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return train_x[torch.cat(picks)]


def score(
    gen: Generator,
    evaluator: Classifier,
    test_x: torch.Tensor,
    floor_x: torch.Tensor,
    per_class: int,
    num_classes: int,
    seed: int,
    knn_k: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """All sample metrics of one generator, and its samples."""
    images, labels, codes = generate(gen, per_class, num_classes, seed)
    extractor = evaluation.FeatureExtractor(evaluator)
    fid = evaluation.fid(extractor, test_x, images)
    floor = evaluation.fid(extractor, test_x, floor_x)
    fake_f, real_f = evaluation.features(extractor, images), evaluation.features(extractor, test_x)
    floor_f, preds = (
        evaluation.features(extractor, floor_x),
        evaluation.predictions(evaluator, images),
    )
    cis = evaluation_intervals.sample_intervals(
        real_f, fake_f, floor_f, preds, labels, knn_k, seed=seed
    )
    return {
        "fid": fid,
        "fid_floor": floor,
        "fid_ratio": fid / max(floor, 1e-9),
        **evaluation.precision_recall(real_f, fake_f, knn_k, seed),
        **{f"{k}_ci_{end}": getattr(iv, end) for k, iv in cis.items() for end in ("low", "high")},
        "class_consistency": evaluation.class_consistency(evaluator, images, labels),
        "diversity": evaluation.mean_pairwise_distance(fake_f),
        "code_entropy_bits": evaluation.code_entropy(codes, gen.tokenizer.codebook_size),
    }, images


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.evaluate
    deps = [PREPARED, JUDGES, TOKENIZER, *PRIORS.values()]
    ctx = common.start("evaluate", params, ("evaluate",), deps, root, 0)
    test_x, _ = load_split("test", root / PREPARED)
    train_x, train_y = load_split("train", root / PREPARED)
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x = floor_sample(train_x, train_y, cfg.samples_per_class, params.base.seed)
    gens = {
        k: load_generator(root / TOKENIZER / "model.pt", root / p / "prior.pt")
        for k, p in PRIORS.items()
    }

    with (
        tracking.stage_run(
            "evaluate", params, ("evaluate",), deps, root, outs=[METRICS, PLOTS]
        ) as run,
        staged(root / METRICS, root / PLOTS) as (metrics_path, plots),
    ):
        metrics: dict[str, Any] = {}
        for name, gen in gens.items():
            metrics[name], images = score(
                gen,
                evaluator,
                test_x,
                floor_x,
                cfg.samples_per_class,
                num_classes,
                params.base.seed,
                cfg.knn_k,
            )
            grid = viz.class_grid(images, cfg.samples_per_class, num_classes)
            viz.save_png(grid, plots / f"samples_{name}.png")
            run.log_image(grid, f"samples_{name}.png")
        metrics["tokenizer"] = tokenizer_metrics(gens["base"].tokenizer, test_x, ctx.device)
        write_json(metrics_path, metrics)
        run.log_metrics(metrics)
    return metrics
