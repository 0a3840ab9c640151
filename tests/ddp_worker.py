"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2` (arguments: see `main`):
checks that need both ranks, reported on rank 0's stdout.

Each stage's training, on two ranks, against the same training on one process at the same
global batch (every rank also runs that reference itself, as a single process would: same
seed, no process group). finetune's RL (`rl`, on tiny random priors) is compared to the byte,
the other stages within TOL."""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from genpipe import artifacts, distributed
from genpipe.artifacts.codes import load_codes
from genpipe.artifacts.judges import judge_arch
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import Finetune, Params, load_params, parse_params
from genpipe.data.prepared import load_split
from genpipe.distributed import SINGLE, World
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace
from genpipe.rewards import WeightedReward
from genpipe.rl import Rollout
from genpipe.runtime import seed_everything
from genpipe.spec import StageContext, StageSpec
from genpipe.stages import finetune, judges, pretrain, prior, tokenizer
from tests.test_rl import CLASSES, brightness, tiny_generator
from tests.tiny import merge

STEPS, EVERY, STOP = 8, 3, 4  # checkpoint after steps 3 and 6; stopped during step 5


def _bytes(model: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def _same_on_every_rank(data: bytes) -> bool:
    every: list[bytes] = [b""] * dist.get_world_size()
    dist.all_gather_object(every, data)
    return all(d == every[0] for d in every)


TOL = 1e-3  # relative L2 of all weights (tests/test_ddp.py says why not bytes)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    state = model.state_dict().values()
    return torch.cat([v.double().flatten() for v in state if v.is_floating_point()])


def _contexts(spec: StageSpec, params: Params, root: Path) -> tuple[StageContext, StageContext]:
    """(one process's context, this rank's): each freshly seeded, no checkpoints."""
    one = dataclasses.replace(spec.start(params, root, 0, deps=()), world=SINGLE)
    return one, spec.start(params, root, 0, deps=())


def compare(
    name: str, spec: StageSpec, params: Params, root: Path, train: Callable[[StageContext], Any]
) -> None:
    """Train on one process, then on every rank; the two must agree within TOL."""
    one_ctx, _ = _contexts(spec, params, root)
    one = _flat(train(one_ctx))
    _, ctx = _contexts(spec, params, root)
    two = _flat(train(ctx))
    rel = float((one - two).norm() / one.norm())
    assert rel <= TOL, f"{name}: 2 processes vs 1, relative L2 {rel:.2e}"
    assert _same_on_every_rank(_bytes_of(two)), f"{name}: ranks hold different weights"
    if dist.get_rank() == 0:
        print(f"{name}: 2 processes vs 1, relative L2 {rel:.2e}")


def _bytes_of(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def stages(pipeline: Path, root: Path) -> None:
    """pretrain (SimCLR, augmentations on), judges (mlp; cnn with BatchNorm), tokenizer
    (k-means init and dead-code restart off: they read rank 0's rows), prior (ar)."""
    x, y = load_split("train", pipeline / artifacts.PREPARED)
    base = load_params(pipeline / "params.yaml").model_dump()
    optim = {"steps": 12, "checkpoint_every": 0}
    over = {
        "pretrain": {"optim": optim},
        "judges": {role: {"dropout": 0.0, "optim": optim} for role in ("reward", "evaluator")},
        "tokenizer": {"kmeans_init": False, "dead_code_threshold": 0.0, "optim": optim},
        "prior": {"dropout": 0.0, "class_dropout": 0.0, "optim": optim},
    }
    params = parse_params(merge(base, over))

    compare("pretrain", pretrain.SPEC, params, root, lambda c: pretrain.train(params, x, c)[0])
    for role in ("reward", "evaluator"):
        cfg = getattr(params.judges, role)
        arch = judge_arch(cfg, params, int(y.max()) + 1)

        def judge(c: StageContext, cfg=cfg, arch=arch) -> torch.nn.Module:
            return judges.train_judge(cfg, arch, x, y, c.device, c.checkpoint, world=c.world)[0]

        compare(f"judges.{role}", judges.SPEC, params, root, judge)
    compare("tokenizer", tokenizer.SPEC, params, root, lambda c: tokenizer.train(params, x, c)[0])

    kind = prior_kind("ar")
    tok = load_tokenizer(pipeline / artifacts.TOKENIZER_FILE)
    codes, labels, _ = load_codes("train", pipeline / artifacts.CODES)
    grid = tok.grid(params.prepare.image_size)
    space = CodeSpace(tok.codebook_size, grid, tok.latent_dim, int(labels.max()) + 1)
    inputs = kind.inputs(tok, codes, kind.sampling(params.prior))

    def train_prior(c: StageContext) -> torch.nn.Module:
        model = kind.build(kind.from_params(params.prior, space))
        settings = kind.settings(params.prior)
        return prior.train(params, kind, model, settings, inputs, labels, c)[0]

    compare("prior", prior.SPEC, params, root, train_prior)


def resume(root: Path) -> None:
    optim = {"steps": STEPS, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": EVERY}
    params = parse_params(
        {"prior": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.3, "optim": optim}}
    )
    kind = prior_kind("ar")
    codes = torch.randint(0, 8, (40, 2, 2), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 3

    def train(on_step=None) -> bytes:
        ctx = prior.SPEC.start(params, root, EVERY, deps=())
        model = kind.build(kind.from_params(params.prior, CodeSpace(8, (2, 2), 4, 3)))
        final, _ = prior.train(params, kind, model, None, codes, labels, ctx, on_step)
        return _bytes(final)

    def stop(step: int, _model) -> None:
        if step == STOP:
            raise KeyboardInterrupt

    straight = train()
    checkpoint = prior.SPEC.start(params, root, EVERY, deps=()).checkpoint
    if dist.get_rank() == 0:
        checkpoint.clear()
    dist.barrier()
    try:
        train(stop)
        raise AssertionError("the run was not stopped")
    except KeyboardInterrupt:
        pass
    dist.barrier()
    assert checkpoint.load()["step"] == EVERY * (STOP // EVERY)
    resumed = train()
    assert resumed == straight, "resumed run differs from the run never stopped"
    assert _same_on_every_rank(resumed), "ranks hold different weights"
    if dist.get_rank() == 0:
        checkpoint.clear()
        print("resume: same bytes on every rank")


def _finetune(kind: str, world: World) -> tuple[bytes, str, list[torch.Tensor]]:
    """(weights, history, labels of each rollout) of finetune.train with `world`'s ranks on a
    tiny prior of `kind`, freshly seeded."""
    gen = tiny_generator(kind).requires_grad_(False)
    gen.prior.requires_grad_(True)
    policy, _ = finetune.make_policy(gen, RL)
    rollout, seen = policy.rollout, []

    def recorded(labels: torch.Tensor, generator: torch.Generator) -> Rollout:
        seen.append(labels.clone())
        return rollout(labels, generator)

    policy.rollout = recorded  # type: ignore[method-assign]
    generator = seed_everything(0)
    reward = WeightedReward({"brightness": 1.0}, {"brightness": brightness})
    result = finetune.train(policy, reward, RL, CLASSES, generator, None, world)
    assert result.steps_run == RL.steps
    return _bytes(policy.net), repr(result.history), seen


# lr high enough that every step moves the weights (a rank's wrong draw would show)
RL = Finetune(steps=3, prompts_per_step=4, group_size=4, inner_iters=2, lr=1e-2, kl_bound=1e6)


def rl(root: Path) -> None:
    """finetune.train on two ranks against one process at the same global batch (4 groups
    of 4), for an ar and a diffusion prior: the same weights and history, to the byte; each
    rank samples whole groups of every step's prompts."""
    world = distributed.init()
    for kind in ("ar", "diffusion"):
        one, one_history, _ = _finetune(kind, SINGLE)
        two, two_history, seen = _finetune(kind, world)
        assert two == one, f"finetune {kind}: 2 processes give other weights than 1"
        assert two_history == one_history, f"finetune {kind}: 2 processes log another history"
        assert _same_on_every_rank(two), f"finetune {kind}: RL replicas diverged"
        per_rank = RL.prompts_per_step // world.size
        for step in range(RL.steps + 1):
            labels = seen[step * per_rank : (step + 1) * per_rank]
            assert all(len(y) == RL.group_size and (y == y[0]).all() for y in labels), step
            every: list[list[int]] = [[] for _ in range(world.size)]
            dist.all_gather_object(every, [int(y[0]) for y in labels])
            expected = finetune.prompts(step, RL, CLASSES, torch.device("cpu"))
            firsts = sorted(sum(every, []))
            assert firsts == sorted(expected.view(-1, RL.group_size)[:, 0].tolist()), step
        if world.is_main:
            print(f"finetune {kind}: 2 processes vs 1, same bytes; whole groups per rank")


def main(argv: list[str]) -> None:
    """`[--pipeline ROOT] CHECK...`: stages needs a tiny pipeline's root (up to the prior)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", type=Path)
    parser.add_argument("checks", nargs="+", choices=("stages", "resume", "rl"))
    args = parser.parse_args(argv)
    root = Path.cwd()
    for name in args.checks:
        if name == "stages":
            stages(args.pipeline, root)
        elif name == "resume":
            resume(root)
        else:
            rl(root)


if __name__ == "__main__":
    main(sys.argv[1:])
