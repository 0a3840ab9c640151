"""`python -m flows.stage <name> [params.yaml]`: one pipeline stage as a thin Prefect flow.

dvc.yaml runs every stage this way. Params are validated, and the tracking server checked,
before Prefect starts, so a bad params.yaml or an unreachable server fails in seconds with
the key (or redacted URI) named, not after the orchestrator spins up.
Transient failures (a tracking server or remote that is briefly unreachable) are retried
with backoff; bad input is not. `retry_transient` is the one retry rule of every flow.
Under `torchrun` rank 0 runs the flow and the other ranks run the stage alongside it,
without a flow (or a temporary Prefect server) of their own.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from genpipe.config import ParamsError, load_params
from genpipe.data.raw import DataError
from genpipe.locks import Busy
from genpipe.runtime import stop_on_sigterm
from genpipe.stages import STAGES, load, run_stage
from genpipe.tracking.store import (
    TrackingLost,
    TrackingUnreachable,
    check_reachable,
    redact,
    redact_tracebacks,
)

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
        return run_stage(name, load_params(params_path))

    @flow(name=name, description=load(name).__doc__ or "")
    def stage(params_path: str = "params.yaml") -> Any:
        return stage_task(params_path)

    return stage


def main(argv: list[str] | None = None) -> None:
    """Validate, then run the stage's flow."""
    stop_on_sigterm()
    redact_tracebacks()
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in STAGES:
        raise SystemExit(f"usage: python -m flows.stage {{{','.join(STAGES)}}} [params.yaml]")
    name, params_path = args[0], (args[1] if len(args) > 1 else "params.yaml")
    try:
        params = load_params(params_path)
        check_reachable()  # before Prefect starts, as the params
        if int(os.environ.get("RANK", "0")) > 0:  # torchrun's other ranks: no flow of their own
            run_stage(name, params)
        else:
            stage_flow(name)(params_path)
    except (ParamsError, DataError, ValueError, Busy, TrackingUnreachable, TrackingLost) as exc:
        print(f"genpipe {name}: error: {redact(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
