"""Curve rows as training makes them. The training loops `emit` each row they log; whoever
records a run (spec.record: the stage's MLflow run) receives them for a block with `to`.
So curves reach the tracking store during training, while neither the loops nor the models
know about tracking."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Sink = Callable[[dict[str, float]], None]
_SINK: ContextVar[Sink | None] = ContextVar("genpipe_curve_sink", default=None)


@contextlib.contextmanager
def to(sink: Sink) -> Iterator[None]:
    """Send every row emitted inside this block to `sink` (the innermost block wins)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def emit(row: dict[str, float]) -> None:
    """One row of a curve ({"step": s, name: value, ...}), to the current sink if any."""
    if (sink := _SINK.get()) is not None:
        sink(row)
