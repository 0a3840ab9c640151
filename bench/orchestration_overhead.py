"""Orchestration overhead per stage: what Prefect and MLflow add to a stage's own work.

Runs the `prepare` stage (the lightest, so overhead dominates) four ways, in this repo:
  1. the stage function in-process (work + MLflow logging, imports already paid),
  2. `genpipe stage prepare`            (a fresh process: imports + MLflow, no Prefect),
  3. `python -m flows.stage prepare` (Prefect flow, temporary server per process),
  4. `python -m flows.stage prepare` with a running server (PREFECT_API_URL), as `make repro` does.
Needs data/raw (`genpipe data ensure`). Prints wall seconds and the overhead of each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genpipe.config import load_params  # noqa: E402
from genpipe.prefect_server import local_server  # noqa: E402
from genpipe.stages import prepare  # noqa: E402


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def main() -> None:
    env = {"PYTHONPATH": "src"}
    params = load_params()
    prepare.run(params)  # warm: MLflow store exists, imports done
    start = time.perf_counter()
    prepare.run(params)
    work = time.perf_counter() - start
    bare = timed([sys.executable, "-m", "genpipe.cli", "stage", "prepare"], env)
    ephemeral = timed([sys.executable, "-m", "flows.stage", "prepare"], env)
    with local_server() as url:
        served = timed(
            [sys.executable, "-m", "flows.stage", "prepare"], {**env, "PREFECT_API_URL": url}
        )
    rows = [
        ("stage function in-process", work),
        ("genpipe stage (new process, no Prefect)", bare),
        ("Prefect flow, temporary server", ephemeral),
        ("Prefect flow, running server", served),
    ]
    print(f"{'how':<42}{'wall s':>8}{'overhead s':>12}{'x work':>8}")
    for name, secs in rows:
        print(f"{name:<42}{secs:>8.2f}{secs - work:>12.2f}{secs / work:>8.1f}")
    print(
        f"Prefect overhead per stage: {ephemeral - bare:.1f} s with a temporary server, "
        f"{served - bare:.1f} s with a running one"
    )


if __name__ == "__main__":
    main()
