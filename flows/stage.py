"""Build the thin Prefect flow that wraps one stage function.

Params are validated before Prefect starts, so a bad params.yaml fails in a second with the
key named, not after the orchestrator spins up. Transient failures (a tracking server or
remote that is briefly unreachable) are retried with backoff; bad input is not.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from genpipe.config import Params, ParamsError, load_params
from genpipe.data.raw import DataError

TRANSIENT = (ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """Retry only what a second try can fix; MLflow wraps connection errors in its own type."""
    if isinstance(exc, TRANSIENT):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "timed out"))


def stage_flow(name: str, run: Callable[[Params], Any]) -> Callable[..., Any]:
    from prefect import flow, task

    def retry_on_transient(_task: Any, _run: Any, state: Any) -> bool:
        try:
            state.result()
        except Exception as exc:  # noqa: BLE001 - we only classify it
            return is_transient(exc)
        return False

    @task(
        name=name,
        retries=3,
        retry_delay_seconds=[2, 8, 30],
        retry_condition_fn=retry_on_transient,
    )
    def stage_task(params: Params) -> Any:
        return run(params)

    @flow(name=name, description=(run.__module__ and sys.modules[run.__module__].__doc__) or "")
    def stage(params_path: str = "params.yaml") -> Any:
        return stage_task(load_params(params_path))

    return stage


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(name: str, run: Callable[[Params], Any], argv: list[str] | None = None) -> None:
    """Entry point of `python -m flows.<stage>`: validate, then run the flow."""
    # DVC and Prefect stop a stage with SIGTERM; make it unwind like Ctrl-C so staged
    # outputs are cleaned up and the MLflow run is marked failed.
    signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else argv
    params_path = args[0] if args else "params.yaml"
    try:
        load_params(params_path)
        stage_flow(name, run)(params_path)
    except (ParamsError, DataError, ValueError) as exc:
        print(f"genpipe {name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
