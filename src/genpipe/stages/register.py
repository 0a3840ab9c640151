"""Stage `register`: log the generator, alias it `candidate`, and promote it to `champion`
only if it beats the current champion on the same evaluation (the champion is re-scored
here, on this run's test split, evaluator and seeds). Aliases move last, so a failure
anywhere leaves them where they were."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from genpipe import artifacts, evaluation, registry
from genpipe.artifacts.judges import load_judge
from genpipe.config import Params
from genpipe.data.prepared import load_split
from genpipe.generator import Generator
from genpipe.outputs import write_json
from genpipe.spec import StageSpec

SPEC = StageSpec(
    "register",
    params=("evaluate", "register"),
    deps=(
        artifacts.EVALUATION,
        artifacts.TOKENIZER,
        *artifacts.PRIORS.values(),
        artifacts.JUDGES,
        artifacts.PREPARED,
    ),
    outs=(artifacts.REPORT,),
    cache=False,
)
LOWER_IS_BETTER = {"fid", "fid_ratio"}


def _score(gen: Generator, params: Params, root: Path) -> dict[str, float]:
    cfg = params.evaluate
    test_x, _ = load_split("test", root / artifacts.PREPARED)
    train_x, train_y = load_split("train", root / artifacts.PREPARED)
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x = evaluation.floor_sample(train_x, train_y, cfg.samples_per_class, params.base.seed)
    metrics, _ = evaluation.score(
        gen, evaluator, test_x, floor_x, cfg, num_classes, params.base.seed
    )
    return metrics


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.register
    prior_dir = artifacts.PRIORS[cfg.prior]
    deps = (
        artifacts.EVALUATION,
        artifacts.TOKENIZER,
        prior_dir,
        artifacts.JUDGES,
        artifacts.PREPARED,
    )
    SPEC.start(params, root, deps=deps)
    candidate = json.loads((root / artifacts.EVALUATION).read_text())[cfg.prior]
    found = registry.champion()
    champion = _score(found[1], params, root) if found else None
    decision = registry.decide(
        candidate, champion, cfg.primary_metric, cfg.primary_metric in LOWER_IS_BETTER
    )
    num_classes = int(load_split("train", root / artifacts.PREPARED)[1].max()) + 1

    with SPEC.record(params, root, deps) as (run, (out,)):
        version = registry.log_generator(
            root / artifacts.TOKENIZER_FILE, root / prior_dir / artifacts.PRIOR_FILE, num_classes
        )
        report = {
            "version": version,
            "prior": cfg.prior,
            "primary_metric": cfg.primary_metric,
            "champion_version": found[0] if found else None,
            **asdict(decision),
        }
        write_json(out / "decision.json", report)
        run.set_tags(
            {
                "decision.promote": decision.promote,
                "decision.reason": decision.reason,
                "model.version": version,
            }
        )
        run.log_metrics({f"candidate.{k}": v for k, v in candidate.items()})
        if champion:
            run.log_metrics({f"champion.{k}": v for k, v in champion.items()})
        run.log_artifact(out / "decision.json")
        registry.set_aliases(
            version,
            decision.promote,
            {
                "promoted": decision.promote,
                "reason": decision.reason,
                f"candidate_{cfg.primary_metric}": candidate[cfg.primary_metric],
                **(
                    {f"champion_{cfg.primary_metric}": champion[cfg.primary_metric]}
                    if champion
                    else {}
                ),
                "run_id": run.run_id,
            },
        )
    return report
