"""Stage `register`: log the generator and decide, against the current champion re-scored
here on this run's test split, evaluator and seeds, whether it becomes `champion`.

Order: under the promotion lock (registry.promotion_lock), the version is registered
(tagged `state=pending`), the champion read and scored, the decision written and logged, the
outputs committed; only then do the aliases move, after a compare-and-set on `champion`. A
failure anywhere before leaves every alias where it was and tags the version `state=failed`
(a SIGKILL leaves it `pending`). A `dvc exp run` registers its version tagged with the
experiment's name and moves no alias; `champion` moves only from a clean tree on the main
branch or from the retrain-and-promote flow."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from genpipe import artifacts, evaluation, lineage, registry
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
    val_x, val_y = load_split("val", root / artifacts.PREPARED)
    num_classes = int(val_y.max()) + 1
    evaluator = load_judge(root, "evaluator", num_classes)
    floor_x, _ = evaluation.floor_sample(val_x, val_y, cfg.samples_per_class, params.base.seed)
    metrics, _ = evaluation.score(
        gen, evaluator, test_x, floor_x, cfg, num_classes, params.base.seed
    )
    return metrics


def experiment_name(root: Path) -> str | None:
    """The DVC experiment this run belongs to: `dvc exp run` sets DVC_EXP_NAME for the stage
    commands; a `--temp`/queued run also runs inside .dvc/tmp/exps."""
    if name := os.environ.get("DVC_EXP_NAME"):
        return name
    parts = root.resolve().parts
    if ".dvc" in parts and "exps" in parts:
        return "unnamed"
    return None


def _branch(root: Path) -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=root, capture_output=True, text=True
    )
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def workspace(root: Path) -> dict[str, Any]:
    """What decides whether this run may move `champion`: `blocked` says why not, or None."""
    git, branch, experiment = lineage.git_info(root), _branch(root), experiment_name(root)
    from_flow = os.environ.get(registry.PROMOTION_FLOW_ENV) == "1"
    if experiment is not None:
        blocked = (
            f"run inside DVC experiment {experiment!r}: registered for comparison "
            "(tag `experiment`), no alias moved"
        )
    elif git["dirty"]:
        blocked = (
            "the git tree is dirty (uncommitted changes besides pipeline outputs), so "
            "`genpipe audit` would call this model unauditable; commit and re-run to promote"
        )
    elif branch != registry.MAIN_BRANCH and not from_flow:
        blocked = (
            f"run on branch {branch!r}: champion moves only from a clean "
            f"{registry.MAIN_BRANCH!r} workspace or the retrain-and-promote flow"
        )
    else:
        blocked = None
    return {
        "git_commit": git["commit"],
        "git_dirty": git["dirty"],
        "branch": branch,
        "experiment": experiment,
        "from_flow": from_flow,
        "blocked": blocked,
    }


def _settle(
    candidate: dict[str, float], params: Params, root: Path, tries: int = 3
) -> tuple[str | None, dict[str, float] | None, registry.Decision]:
    """Read and score the champion, decide, and re-read it: if it moved meanwhile (a racer
    the lock does not reach, e.g. on a server store), decide again against the new one."""
    cfg = params.register
    for _ in range(tries):
        found = registry.champion()
        scored = _score(found[1], params, root) if found else None
        decision = registry.decide(
            candidate,
            scored,
            cfg.primary_metric,
            cfg.primary_metric in LOWER_IS_BETTER,
            cfg.margin,
        )
        version = found[0] if found else None
        if registry.champion_version() == version:
            return version, scored, decision
    raise registry.ChampionMoved(f"champion kept moving while {tries} decisions were made")


def _intervals(metrics: dict[str, float] | None, keys: tuple[str, ...]) -> dict[str, Any]:
    if metrics is None:
        return {}
    return {k: [metrics[k], *registry.interval(metrics, k)] for k in keys}


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
    for key in (cfg.primary_metric, registry.GUARD):
        registry.interval(candidate, key)  # an old evaluation without intervals stops here
    place = workspace(root)
    num_classes = int(load_split("train", root / artifacts.PREPARED)[1].max()) + 1
    created: list[str] = []
    try:
        with registry.promotion_lock():
            with SPEC.record(params, root, deps) as (run, (out,)):
                version = registry.log_generator(
                    root / artifacts.TOKENIZER_FILE,
                    root / prior_dir / artifacts.PRIOR_FILE,
                    num_classes,
                )
                created.append(version)
                found, champion, decision = _settle(candidate, params, root)
                if decision.promote and place["blocked"]:
                    decision = replace(
                        decision,
                        promote=False,
                        reason=f"{decision.reason}; not promoted: {place['blocked']}",
                    )
                report = _report(version, found, decision, place, params)
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
                registry.mark(version, _version_tags(report, champion, run.run_id, params))
            # last: outputs and lineage are committed; an experiment moves no alias
            if place["experiment"] is None:
                registry.move_aliases(version, decision.promote, found)
            else:
                registry.mark(version, {"state": "experiment"})
    except BaseException as e:
        if created:
            _mark_failed(created[0], e)
        raise
    return report


def _report(
    version: str,
    found: str | None,
    decision: registry.Decision,
    place: dict[str, Any],
    params: Params,
) -> dict[str, Any]:
    cfg = params.register
    keys = (cfg.primary_metric, registry.GUARD)
    moved = [] if place["experiment"] else [registry.CANDIDATE]
    return {
        "version": version,
        "prior": cfg.prior,
        "primary_metric": cfg.primary_metric,
        "margin": cfg.margin,
        "champion_version": found,
        # [estimate, low, high]; FID-ratio/precision/recall intervals are median-shifted
        # bootstrap intervals (genpipe.evaluation_intervals)
        "intervals": {
            "candidate": _intervals(decision.candidate, keys),
            "champion": _intervals(decision.champion, keys),
        },
        "aliases_moved": moved + ([registry.CHAMPION] if decision.promote else []),
        "workspace": place,
        **asdict(decision),
    }


def _version_tags(
    report: dict[str, Any], champion: dict[str, float] | None, run_id: str, params: Params
) -> dict[str, Any]:
    primary = params.register.primary_metric
    tags: dict[str, Any] = {
        "promoted": report["promote"],
        "reason": report["reason"][:4000],
        f"candidate_{primary}": report["candidate"][primary],
        "run_id": run_id,
    }
    if champion:
        tags[f"champion_{primary}"] = champion[primary]
    if report["workspace"]["experiment"]:
        tags["experiment"] = report["workspace"]["experiment"]
    return tags


def _mark_failed(version: str, error: BaseException) -> None:
    """Tag a version whose run failed before its aliases moved; a store that is itself failing
    must not hide the original error."""
    error_tag = f"{type(error).__name__}: {error}"[:500]
    with contextlib.suppress(Exception):  # best effort; the original error is re-raised
        registry.mark(version, {"state": "failed", "error": error_tag})
