"""Reading runs back (audit, registry): a run's lineage record, and which run made a model."""

from __future__ import annotations

from typing import Any

from genpipe.tracking import store


def run_record(run_id: str) -> dict[str, Any]:
    """A stage run's tags, params and its logged lineage files (meta and output digests)."""
    mlflow = store.mlflow()
    run = mlflow.MlflowClient().get_run(run_id)
    record: dict[str, Any] = {
        "run_id": run_id,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
    }
    for name in ("meta", "outputs"):
        try:
            record[name] = mlflow.artifacts.load_dict(f"runs:/{run_id}/lineage/{name}.json")
        except Exception:  # noqa: BLE001 - missing artifact is reported by the caller
            record[name] = None
    return record


def resolve_model(spec: str) -> tuple[str, str, str]:
    """`NAME@ALIAS` or `NAME/VERSION` -> (name, version, run_id of the run that logged it)."""
    client = store.client()
    if "@" in spec:
        name, alias = spec.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in spec:
        name, version = spec.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    else:
        raise ValueError(f"model {spec!r}: expected NAME@ALIAS or NAME/VERSION")
    return mv.name, mv.version, mv.run_id
