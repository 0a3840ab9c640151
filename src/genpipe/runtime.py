"""Where and how a stage computes: seeds, deterministic kernels, the device, CPU threads,
host-to-device copies and mixed precision. Deterministic on CPU for a seed; on CUDA fast
(bf16 autocast, the usual non-deterministic kernels). Every stage starts here (genpipe.spec)."""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from genpipe.config import ParamsError

CPU = torch.device("cpu")


def seed_everything(seed: int, device: torch.device = CPU) -> torch.Generator:
    """Seed every RNG; on CPU also make kernels deterministic, so a seed gives the same bytes.
    On CUDA the fast kernels stay (README: what is deterministic on CUDA). Returns a
    generator for the stage's draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cpu":
        deterministic_kernels()
    return torch.Generator().manual_seed(seed)


def deterministic_kernels() -> None:
    """Deterministic CPU kernels (warn where none exists). The kernel flag alone: the public
    switch also imports Inductor to set its deterministic mode (~3.5 s at every stage start),
    which only torch.compile reads, and genpipe compiles on CUDA alone."""
    torch._C._set_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def cpu_threads(device: torch.device, n: int = 1) -> Iterator[None]:
    """`n` intra-op threads on CPU for a stretch of many small ops (RL batches of tens of
    samples, test-sized models): too small to split, and on a shared CPU OpenMP threads that
    wait on each other made such steps 10-20x slower than one thread (measured on 2 busy
    cores)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_device(requested: str) -> torch.device:
    """`auto` takes CUDA when present; `cuda` without a GPU is an error, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(
            f"base.device is {requested!r} but no CUDA device is visible: set base.device "
            "to 'auto' or 'cpu' in params.yaml"
        )
    return torch.device(requested)


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def stop_on_sigterm() -> None:
    """DVC and Prefect stop a stage with SIGTERM; make it unwind like Ctrl-C, so staged
    outputs are cleaned up, the stage lock released and the MLflow run marked failed."""
    signal.signal(signal.SIGTERM, _terminate)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; full precision on CPU so results are bit-reproducible there."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor onto `device`: on CUDA from pinned memory without blocking, so the copy
    overlaps the work queued before it; on CPU the tensor itself."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def maybe_compile(model: nn.Module, requested: bool, device: torch.device) -> bool:
    """torch.compile `model`'s call in place when `base.compile` asks and the device is CUDA
    (on CPU, Inductor's C++ build costs more than test-sized models gain); True if it did."""
    if not requested or device.type != "cuda":
        return False
    model.compile()
    return True
