"""`python -m flows.stage <name> [params.yaml]`: one pipeline stage as a thin Prefect flow.

dvc.yaml runs every stage this way. Params are validated, and the tracking server checked,
before Prefect starts, so a bad params.yaml or an unreachable server fails in seconds with
the key (or redacted URI) named, not after the orchestrator spins up.
Transient failures (a tracking server or remote that is briefly unreachable) are retried
with backoff; bad input is not. `retry_transient` is the one retry rule of every flow.

Where it runs decides how much Prefect it needs: under the `pipeline` flow (which sets
PIPELINE_TASK_ENV) the stage is already a Prefect task there, which retries it and shows
its output, so the stage runs without a second flow (and without importing Prefect); with
PREFECT_API_URL set it is a flow on that server; under a plain `dvc repro` it is a flow on
the shared local server (genpipe.prefect_server.shared_server), not a temporary one each.
Either way the command usually runs it in a child of a warm process that imported torch,
MLflow and Prefect once (flows.warm): the pipeline's, or under a plain `dvc repro` the
checkout's.
Under `torchrun` rank 0 runs the flow and the other ranks run the stage alongside it,
without a flow (or a Prefect server) of their own.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from genpipe.cli import REFUSALS, HelpFormatter
from genpipe.config import load_params
from genpipe.stages import STAGES, load, run_stage
from genpipe.tracking.store import (
    check_reachable,
    redact,
    redact_exception,
    redact_tracebacks,
)
from genpipe.tracking.write import FLOW_RUN_ENV

# Set by flows.pipeline for the `dvc repro` of one of its tasks: that task is the orchestration.
PIPELINE_TASK_ENV = "GENPIPE_PIPELINE_TASK"
TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Retry only what a second try can fix; MLflow wraps connection errors in its own type.
    An exception that knows (a `transient` attribute, e.g. a failed `dvc repro`) says so."""
    if isinstance(flag := getattr(exc, "transient", None), bool):
        return flag
    if isinstance(exc, TRANSIENT):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out"))


def retry_transient(_task: Any, _run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a task whose exception is transient."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def stage_flow(name: str) -> Any:
    from prefect import flow, task

    @task(
        name=name,
        retries=3,
        retry_delay_seconds=[2, 8, 30],
        retry_condition_fn=retry_transient,
    )
    def stage_task(params_path: str) -> Any:
        try:
            return run_stage(name, load_params(params_path))
        except Exception as exc:  # Prefect logs and stores it: credentials out first
            raise redact_exception(exc)  # noqa: B904 - the same exception, redacted

    @flow(name=name, description=load(name).__doc__ or "")
    def stage(params_path: str = "params.yaml") -> Any:
        from prefect.runtime import flow_run

        os.environ[FLOW_RUN_ENV] = str(flow_run.id)  # a tag of the stage's MLflow run
        return stage_task(params_path)

    return stage


def parser() -> argparse.ArgumentParser:
    """`--help` answers without importing torch, MLflow or Prefect."""
    p = argparse.ArgumentParser(
        prog="python -m flows.stage",
        description="Run one pipeline stage as a Prefect flow (what each dvc.yaml cmd runs). "
        f"Stages, in pipeline order: {', '.join(STAGES)}.",
        epilog="`genpipe stage NAME` runs a stage in-process without Prefect.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("name", choices=STAGES, metavar="STAGE", help="the stage to run")
    p.add_argument("params", nargs="?", default="params.yaml", help="the params file")
    return p


def run_flow(name: str, params_path: str) -> None:
    """The stage as a flow on the configured server, else on the shared local one."""
    from genpipe.prefect_server import shared_server

    if os.environ.get("PREFECT_API_URL"):
        stage_flow(name)(params_path)
        return
    with shared_server() as api_url:
        os.environ["PREFECT_API_URL"] = api_url  # before Prefect reads its settings
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: api_url}):
                stage_flow(name)(params_path)
        finally:  # the shared server stops when idle: nothing after this may still point at it
            os.environ.pop("PREFECT_API_URL", None)


def main(argv: list[str] | None = None) -> None:
    """Validate, then run the stage (as a flow unless a pipeline task already is one)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from genpipe.runtime import stop_on_sigterm  # torch: after a `--help` has answered

    stop_on_sigterm()
    redact_tracebacks()
    try:
        params = load_params(args.params)
        check_reachable()  # before Prefect starts, as the params
        torchrun_rank = int(os.environ.get("RANK", "0"))
        if os.environ.get(PIPELINE_TASK_ENV) or torchrun_rank > 0:
            run_stage(args.name, params)
        else:
            run_flow(args.name, args.params)
    except REFUSALS as exc:
        print(f"genpipe {args.name}: error: {redact(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None


def command(argv: list[str]) -> None:
    """`python -m flows.stage`: in a child of a warm process when one can serve it
    (flows.warm), else here."""
    args = parser().parse_args(argv)  # `--help` and a bad name answer here, without torch
    from flows.warm import run_warm

    if (code := run_warm([args.name, args.params])) is not None:
        raise SystemExit(code)
    main(argv)


if __name__ == "__main__":
    command(sys.argv[1:])
