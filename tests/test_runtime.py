"""Where a stage computes: bf16 autocast, deterministic kernels and torch.compile on the
device each belongs to, pinned copies to CUDA, and `base.compile` reaching every `fit`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from genpipe import runtime, training
from genpipe.artifacts.judges import judge_arch
from genpipe.config import parse_params
from genpipe.stages import judges, pretrain

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch._C._set_deterministic_algorithms(before, warn_only=True)


def test_autocast_is_bf16_on_cuda_only():
    on_cuda = runtime.autocast(CUDA)
    assert isinstance(on_cuda, torch.autocast)
    assert on_cuda.fast_dtype == torch.bfloat16 and on_cuda.device == "cuda"
    assert isinstance(runtime.autocast(CPU), contextlib.nullcontext)


def test_deterministic_kernels_are_set_on_cpu_only(restore_determinism):
    torch._C._set_deterministic_algorithms(False)
    runtime.seed_everything(0, CUDA)  # seeds only: no GPU is touched
    assert not torch.are_deterministic_algorithms_enabled()
    runtime.seed_everything(0, CPU)
    assert torch.are_deterministic_algorithms_enabled()


def test_compile_only_when_asked_and_on_cuda(monkeypatch):
    calls: list[nn.Module] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: calls.append(self))
    model = nn.Linear(2, 2)
    assert not runtime.maybe_compile(model, True, CPU)
    assert not runtime.maybe_compile(model, False, CUDA)
    assert runtime.maybe_compile(model, True, CUDA)
    assert calls == [model]


def test_to_device_keeps_a_cpu_tensor_and_pins_for_cuda(monkeypatch):
    t = torch.arange(4.0)
    assert runtime.to_device(t, CPU) is t
    seen: dict[str, object] = {}

    class Pinned:
        def to(self, device, non_blocking=False):
            seen.update(device=device, non_blocking=non_blocking)
            return "copied"

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: Pinned())
    assert runtime.to_device(t, CUDA) == "copied"
    assert seen == {"device": CUDA, "non_blocking": True}


@pytest.mark.usefixtures("one_thread")
def test_base_compile_reaches_every_fit(tmp_path, monkeypatch):
    """pretrain and judges (as tokenizer and prior) hand base.compile to `fit`."""
    asked: list[bool] = []
    monkeypatch.setattr(training, "maybe_compile", lambda m, requested, d: asked.append(requested))
    optim = {"steps": 1, "batch_size": 8, "warmup_steps": 1}
    params = parse_params(
        {
            "base": {"compile": True},
            "tokenizer": {"channels": [4, 8], "num_res_blocks": 0, "embed_dim": 4},
            "pretrain": {"proj_dim": 8, "optim": optim},
            "judges": {"reward": {"arch": "mlp", "seed": 1, "width": 8, "optim": optim}},
        }
    )
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    pretrain.train(params, x, pretrain.SPEC.start(params, tmp_path, 0, deps=()))
    ctx = judges.SPEC.start(params, tmp_path, 0, deps=())
    cfg = params.judges.reward
    judges.train_judge(
        cfg,
        judge_arch(cfg, params, 2),
        x,
        torch.arange(16) % 2,
        CPU,
        ctx.checkpoint,
        compile=ctx.compile,
    )
    assert asked == [True, True]
