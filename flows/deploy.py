"""Serve `retrain_and_promote` on a schedule from this machine (`make serve`).

`flow.serve` registers the deployment with the Prefect server at PREFECT_API_URL and runs
its scheduled and API-triggered runs in this process; the schedule can then be paused or
changed in the UI (Deployments -> retrain-and-promote-nightly). For work pools use
prefect.yaml: `prefect deploy --name nightly` (process) or `nightly-docker` (README: Work pools).
"""

from __future__ import annotations

import argparse
import os

from flows.pipeline import retrain_and_promote_flow

DEPLOYMENT = "nightly"
DEFAULT_CRON = "0 2 * * *"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cron", default=os.environ.get("GENPIPE_CRON", DEFAULT_CRON))
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--pull", action="store_true", help="dvc pull before each run")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit(
            "PREFECT_API_URL is not set: start `prefect server start` (or `make ui`) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api, so the schedule outlives this process"
        )
    retrain_and_promote_flow.serve(
        name=args.name,
        cron=args.cron,
        parameters={"pull": args.pull},
        global_limit=1,  # one retrain at a time: two would race on the checkout and store
        limit=1,
        description="nightly: data update, dvc repro, promotion decision",
    )


if __name__ == "__main__":
    main()
