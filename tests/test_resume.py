"""Every stage that trains resumes: a run stopped after its checkpoint and started again gives
the same weights, byte for byte, and the same curve as a run never stopped. Dropout draws
from torch's global RNG, so checkpoints must hold it (as well as each stage's generators)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from genpipe.artifacts.judges import judge_arch
from genpipe.checkpoint import Checkpoint
from genpipe.config import parse_params
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace
from genpipe.stages import judges, pretrain, prior

STEPS, EVERY, STOP = 8, 3, 4  # checkpoint after steps 3 and 6; stopped during step 5


def _bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def _stop(step: int, _model) -> None:
    if step == STOP:
        raise KeyboardInterrupt


def _straight_and_resumed(train, checkpoint: Checkpoint):
    """(weights, curve) of an uninterrupted run, and of one stopped at STOP then resumed."""
    model, history = train(None)
    straight = _bytes(model), history
    checkpoint.clear()
    with pytest.raises(KeyboardInterrupt):
        train(_stop)
    assert checkpoint.load()["step"] == EVERY
    model, history = train(None)
    checkpoint.clear()
    return straight, (_bytes(model), history)


OPTIM = {"steps": STEPS, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": EVERY}


def test_prior_resumes_to_the_same_bytes(tmp_path, one_thread):
    params = parse_params(
        {"prior": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.3, "optim": OPTIM}}
    )
    kind = prior_kind("ar")
    codes = torch.randint(0, 8, (40, 2, 2), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 3

    def train(on_step):
        ctx = prior.SPEC.start(params, tmp_path, EVERY, deps=())
        model = kind.build(kind.from_params(params.prior, CodeSpace(8, (2, 2), 4, 3)))
        return prior.train(params, kind, model, None, codes, labels, ctx, on_step)

    checkpoint = prior.SPEC.start(params, tmp_path, EVERY, deps=()).checkpoint
    straight, resumed = _straight_and_resumed(train, checkpoint)
    assert resumed == straight


def test_judges_resume_to_the_same_bytes(tmp_path, one_thread):
    evaluator = {"arch": "cnn", "seed": 2, "dropout": 0.5, "width": 8, "optim": OPTIM}
    params = parse_params({"judges": {"evaluator": evaluator}})
    cfg = params.judges.evaluator
    arch = judge_arch(cfg, params, 3)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 3
    checkpoint = Checkpoint(tmp_path / "judges" / "evaluator.pt", "fingerprint", EVERY)

    def train(on_step):
        return judges.train_judge(cfg, arch, x, y, torch.device("cpu"), checkpoint, on_step)

    straight, resumed = _straight_and_resumed(train, checkpoint)
    assert resumed == straight


def test_pretrain_resumes_to_the_same_bytes(tmp_path, one_thread):
    params = parse_params(
        {
            "tokenizer": {"channels": [4, 8], "num_res_blocks": 0, "embed_dim": 4},
            "pretrain": {"proj_dim": 8, "optim": OPTIM},
        }
    )
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def train(on_step):
        ctx = pretrain.SPEC.start(params, tmp_path, EVERY, deps=())
        return pretrain.train(params, x, ctx, on_step)

    checkpoint = pretrain.SPEC.start(params, tmp_path, EVERY, deps=()).checkpoint
    straight, resumed = _straight_and_resumed(train, checkpoint)
    assert resumed == straight


def test_checkpoint_without_rng_states_is_not_resumed(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"fingerprint": "f", "step": 3, "model": {}}, path)
    assert Checkpoint(path, "f", 3).load() is None


def test_stage_checkpoints_live_per_stage(tmp_path):
    params = parse_params({})
    ckpt = judges.SPEC.start(params, tmp_path, 0, deps=()).checkpoint
    assert ckpt.path == tmp_path / Path("checkpoints/judges/last.pt")
    assert ckpt.part("reward", 5).path == tmp_path / "checkpoints/judges/reward.pt"
