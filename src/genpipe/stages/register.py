"""Stage `register`: log the generator, alias it `candidate`, and promote it to `champion`
only if it beats the current champion on the same evaluation (the champion is re-scored
here, on this run's test split, evaluator and seeds). Aliases move last, so a failure
anywhere leaves them where they were."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from genpipe import registry
from genpipe.config import Params
from genpipe.data.prepared import PREPARED, load_split
from genpipe.generator import Generator
from genpipe.outputs import staged, write_json
from genpipe.stages import common, evaluate
from genpipe.stages.judges import load_judge
from genpipe.stages.tokenizer import OUT as TOKENIZER
from genpipe.tracking import write as tracking

REPORT = Path("reports/register")
LOWER_IS_BETTER = {"fid", "fid_ratio"}


def _score(gen: Generator, params: Params, root: Path) -> dict[str, float]:
    cfg = params.evaluate
    test_x, _ = load_split("test", root / PREPARED)
    train_x, train_y = load_split("train", root / PREPARED)
    num_classes = int(train_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x = evaluate.floor_sample(train_x, train_y, cfg.samples_per_class, params.base.seed)
    metrics, _ = evaluate.score(
        gen,
        evaluator,
        test_x,
        floor_x,
        cfg.samples_per_class,
        num_classes,
        params.base.seed,
        cfg.knn_k,
    )
    return metrics


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    cfg = params.register
    prior_dir = evaluate.PRIORS[cfg.prior]
    deps = [evaluate.METRICS, TOKENIZER, prior_dir, evaluate.JUDGES, PREPARED]
    common.start("register", params, ("evaluate", "register"), deps, root, 0)
    candidate = json.loads((root / evaluate.METRICS).read_text())[cfg.prior]
    found = registry.champion()
    champion = _score(found[1], params, root) if found else None
    decision = registry.decide(
        candidate, champion, cfg.primary_metric, cfg.primary_metric in LOWER_IS_BETTER
    )
    num_classes = int(load_split("train", root / PREPARED)[1].max()) + 1

    with (
        tracking.stage_run(
            "register", params, ("evaluate", "register"), deps, root, outs=[REPORT]
        ) as run,
        staged(root / REPORT) as (out,),
    ):
        version = registry.log_generator(
            root / TOKENIZER / "model.pt", root / prior_dir / "prior.pt", num_classes
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
        run.write_meta(out)
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
