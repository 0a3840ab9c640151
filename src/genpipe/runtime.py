"""Where and how a stage computes: seeds, deterministic kernels, the device, CPU threads and
mixed precision. Deterministic on CPU for a seed; every stage starts here (genpipe.spec)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from genpipe.config import ParamsError


def seed_everything(seed: int) -> torch.Generator:
    """Seed every RNG and make kernels deterministic; returns a generator for the stage's draws."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    deterministic_kernels()
    return torch.Generator().manual_seed(seed)


def deterministic_kernels() -> None:
    """Deterministic kernels (warn where none exists). The public switch also imports Inductor
    to set its deterministic mode, ~3.5 s at every stage start; only torch.compile, which
    genpipe uses on CUDA alone, reads that mode, so CPU-only machines set the kernel flag alone."""
    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
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
    """`auto` takes CUDA when present, else the CPU (Apple's `mps` only when asked for: its
    kernels are not deterministic and some ops fall back to the CPU); a device that is asked
    for and absent is an error naming the key, not a silent fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(
            f"base.device is {requested!r} but no CUDA device is visible: set base.device "
            "to 'auto' or 'cpu' in params.yaml"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        why = "built without it" if not torch.backends.mps.is_built() else "no MPS device here"
        raise ParamsError(
            f"base.device is 'mps' but this torch cannot use Apple's MPS ({why}; it needs "
            "Apple silicon and macOS 12.3+): set base.device to 'auto' or 'cpu' in params.yaml"
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
