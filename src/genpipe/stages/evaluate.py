"""Stage `evaluate`: score the base and the fine-tuned prior with the evaluator judge.

For each generator: N samples per class (seeded); FID in the evaluator's penultimate feature
space against the test split, with its floor (FID of real val images, which the evaluator never
trained on, against the same test split: m per class, m = min(samples_per_class, the smallest
val class); `fid_floor_n` reports the floor's N) and their ratio at equal N (the generated
samples cut into disjoint sets of the floor's size, their mean FID over the floor's); k-NN
precision/recall; class consistency; diversity (mean pairwise feature distance, entropy of
the codes); plus the tokenizer's reconstructions.
FID ratio, precision, recall and class consistency get 95% bootstrap intervals (`*_ci_low`,
`*_ci_high`; see genpipe.evaluation_intervals).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genpipe import artifacts, evaluation, viz
from genpipe.artifacts.generator import load_generator
from genpipe.artifacts.judges import load_judge
from genpipe.config import Params
from genpipe.data.prepared import load_split
from genpipe.outputs import write_json
from genpipe.spec import StageSpec

SPEC = StageSpec(
    "evaluate",
    params=("evaluate",),
    deps=(artifacts.PREPARED, artifacts.JUDGES, artifacts.TOKENIZER, *artifacts.PRIORS.values()),
    metrics=artifacts.EVALUATION,
    plots=artifacts.plots("evaluate"),
)


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.evaluate
    ctx = SPEC.start(params, root)
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    val_x, val_y = load_split("val", root / artifacts.PREPARED)
    num_classes = int(val_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x, _ = evaluation.floor_sample(val_x, val_y, cfg.samples_per_class, params.base.seed)
    gens = {
        k: load_generator(root / artifacts.TOKENIZER_FILE, root / p / artifacts.PRIOR_FILE)
        for k, p in artifacts.PRIORS.items()
    }

    with SPEC.record(params, root) as (run, (metrics_path, plots)):
        metrics: dict[str, Any] = {}
        for name, gen in gens.items():
            metrics[name], images = evaluation.score(
                gen, evaluator, test_x, floor_x, cfg, num_classes, params.base.seed
            )
            grid = viz.class_grid(images, cfg.samples_per_class, num_classes)
            viz.save_png(grid, plots / f"samples_{name}.png")
            run.log_image(grid, f"samples_{name}.png")
        metrics["tokenizer"] = evaluation.reconstruction(gens["base"].tokenizer, test_x, ctx.device)
        write_json(metrics_path, metrics)
        run.log_metrics(metrics)
    return metrics
