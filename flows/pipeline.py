"""Prefect flow over the DVC DAG: each stage is a task that runs `dvc repro -s <stage>`.

DVC decides what is stale and caches outputs; Prefect shows each stage as a task run with
its state, retries transient failures and keeps the history. `python -m flows.pipeline`
is what `make repro` calls.
"""

from __future__ import annotations

import subprocess
import sys
import time
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import yaml

from flows.server import local_server


def _outs(stage: dict[str, Any]) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []) or []:
            paths.append(next(iter(item)) if isinstance(item, dict) else item)
    return paths


def stage_order(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages of dvc.yaml in dependency order (a stage after every stage whose out it reads)."""
    stages: dict[str, Any] = yaml.safe_load(dvc_yaml.read_text())["stages"]
    produced = {out: name for name, st in stages.items() for out in _outs(st)}
    graph = {
        name: {
            producer
            for dep in st.get("deps", []) or []
            for out, producer in produced.items()
            if producer != name and (dep == out or dep.startswith(out.rstrip("/") + "/"))
        }
        for name, st in stages.items()
    }
    return list(TopologicalSorter(graph).static_order())


def repro_stage(name: str) -> dict[str, Any]:
    """Run one stage through DVC; report whether it ran or was up to date, and its time."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["dvc", "repro", "--single-item", name], capture_output=True, text=True
    )
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    if "didn't change, skipping" in proc.stdout:
        outcome = "up to date"
    elif "is cached - skipping run" in proc.stdout:
        outcome = "restored from run cache"
    else:
        outcome = "ran"
    return {"stage": name, "outcome": outcome, "seconds": round(time.perf_counter() - start, 1)}


def build_flow() -> Any:
    from prefect import flow, task

    stage_task = task(repro_stage, name="dvc-repro-stage", retries=2, retry_delay_seconds=5)

    @flow(name="pipeline")
    def pipeline() -> list[dict[str, Any]]:
        results = []
        for name in stage_order():
            results.append(stage_task.with_options(name=name)(name))
        return results

    return pipeline


def main() -> None:
    with local_server():
        results = build_flow()()
    for r in results:
        print(f"{r['stage']:<12} {r['outcome']:<24} {r['seconds']:>7.1f} s")


if __name__ == "__main__":
    main()
