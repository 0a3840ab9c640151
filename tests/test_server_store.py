"""Fast checks of what a shared tracking server needs (the slow ones run a real server:
tests/test_tracking_server.py): a lost server named in the error, and the alias lease that
makes the champion's compare-and-set atomic across machines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from genpipe import registry
from genpipe.stages import run_stage
from genpipe.tracking import store

LOST = "API request to endpoint /api/2.0/mlflow/runs/get failed: Max retries exceeded"


def test_a_lost_server_is_named_redacted(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:secret@127.0.0.1:9/")
    lost = store.lost_server(RuntimeError(LOST), "register")
    assert isinstance(lost, store.TrackingLost) and lost.transient
    assert "MLflow tracking server http://***@127.0.0.1:9/ stopped answering during stage " in (
        str(lost)
    )
    assert "secret" not in str(lost) and "re-run the stage" in str(lost)
    assert store.lost_server(ValueError("bad input"), "register") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")  # no server to lose
    assert store.lost_server(RuntimeError(LOST), "register") is None


def test_run_stage_turns_a_lost_server_into_tracking_lost(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")

    def lose(params, root):
        raise RuntimeError(LOST)

    stage = SimpleNamespace(SPEC=SimpleNamespace(view=lambda params: params), run=lose)
    monkeypatch.setattr("genpipe.stages.load", lambda name: stage)
    with pytest.raises(
        store.TrackingLost, match=r"127\.0\.0\.1:9 stopped answering during stage register"
    ):
        run_stage("register", None)  # type: ignore[arg-type]


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return store.client()


def test_the_alias_lease_is_exclusive_and_released(sqlite_store):
    with (
        registry.alias_lease(),
        pytest.raises(TimeoutError, match="alias lease of another register run"),
        registry.alias_lease(timeout=0.5),
    ):
        pass
    with registry.alias_lease(timeout=0.5):  # released: free again
        pass
    names = [m.name for m in sqlite_store.search_registered_models()]
    assert registry.LEASE not in names


def test_a_stale_lease_is_taken_over(sqlite_store):
    sqlite_store.create_registered_model(registry.LEASE)  # a holder that died
    with registry.alias_lease(timeout=5, stale_after=0.0):
        pass
    assert registry.LEASE not in [m.name for m in sqlite_store.search_registered_models()]
