"""A tiny project for the register stage's tests: prepared data made from class-typed codes,
a tokenizer, an evaluator and two priors (a trained one and a random-weights one), in a git
repo on `main`. Also the entry point of the racing processes (`python -m`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from genpipe import artifacts
from genpipe.artifacts.tokenizer import build_tokenizer, tokenizer_arch
from genpipe.config import Params, parse_params
from genpipe.modelio import save_model
from genpipe.models.classifier import Classifier
from genpipe.models.priors import prior_kind
from genpipe.models.priors.base import CodeSpace

CLASSES = 3
PARAMS = {
    "tokenizer": {"channels": [4, 8], "num_res_blocks": 0, "embed_dim": 4, "codebook_size": 8},
    "prior": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0, "class_dropout": 0.0},
    "evaluate": {"samples_per_class": 20, "knn_k": 3},
}


def params() -> Params:
    return parse_params(PARAMS)


def _codes(n: int, grid: tuple[int, int], g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % CLASSES
    codes = labels[:, None, None] * 2 + g.integers(0, 2, (n, *grid))  # class-typed: 2c or 2c+1
    return codes.astype(np.int64), labels.astype(np.int64)


def build(root: Path) -> None:
    """Write the inputs of `register` under root (prior files: `good.pt`, `random.pt`)."""
    p = params()
    torch.manual_seed(0)
    tokenizer = build_tokenizer(p).eval()
    save_model(root / artifacts.TOKENIZER_FILE, "tokenizer", tokenizer_arch(p), tokenizer)
    grid = tokenizer.grid(p.prepare.image_size)
    g = np.random.default_rng(0)
    for split, n in (("train", 90), ("val", 60), ("test", 60)):
        codes, labels = _codes(n, grid, g)
        with torch.no_grad():
            images = tokenizer.decode_codes(torch.from_numpy(codes)).clamp(0, 1)
        folder = root / artifacts.PREPARED / split
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "images.npy", images.numpy().astype(np.float32))
        np.save(folder / "labels.npy", labels)
    arch = {"arch": "mlp", "in_channels": 1, "image_size": 8, "num_classes": CLASSES, "width": 16}
    judge = Classifier(**arch, dropout=0.0)
    save_model(
        root / artifacts.JUDGES / "evaluator.pt", "classifier", {**arch, "dropout": 0.0}, judge
    )

    kind = prior_kind("ar")
    space = CodeSpace(8, grid, tokenizer.latent_dim, CLASSES)
    prior_arch = kind.from_params(p.prior, space)
    sampling = kind.sampling(p.prior)
    codes, labels = _codes(300, grid, g)
    good = kind.build(prior_arch).train()
    opt = torch.optim.Adam(good.parameters(), lr=0.02)
    rng = torch.Generator().manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        good.loss(torch.from_numpy(codes), torch.from_numpy(labels), rng).backward()
        opt.step()
    torch.manual_seed(1)
    bad = kind.build(prior_arch)
    with torch.no_grad():  # degraded: random weights, scaled up so samples are far from uniform
        for w in bad.parameters():
            w.normal_(0, 1.0)
    for name, net in (("good", good), ("random", bad)):
        save_model(
            root / f"{name}.pt", "prior", prior_arch, net.eval(), prior_kind="ar", sampling=sampling
        )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    (root / "README").write_text("tiny\n")
    subprocess.run([*git, "add", "README"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=root, check=True)


def use(root: Path, name: str, seed: int = 0) -> dict[str, float]:
    """Make prior `name` the candidate: its file as the finetuned prior and its evaluation
    (samples and bootstrap drawn with `seed`)."""
    from genpipe.artifacts.generator import load_generator
    from genpipe.stages.register import _score

    target = root / artifacts.PRIORS["finetuned"] / artifacts.PRIOR_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((root / f"{name}.pt").read_bytes())
    gen = load_generator(root / artifacts.TOKENIZER_FILE, target)
    metrics = _score(gen, parse_params({**PARAMS, "base": {"seed": seed}}), root)
    out = root / artifacts.EVALUATION
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"finetuned": metrics}))
    return metrics


def fast_intervals() -> None:
    """Bootstrap with 50 resamples instead of 1,000: the same intervals, test-sized."""
    import functools

    from genpipe import evaluation_intervals

    original = evaluation_intervals.sample_intervals
    evaluation_intervals.sample_intervals = functools.partial(original, resamples=50)


def main() -> None:
    """Run `register` on the project at argv[1] and print its decision as JSON."""
    from genpipe.stages import register

    fast_intervals()

    root = Path(sys.argv[1])
    report = register.run(register.SPEC.view(params()), root)
    print(json.dumps({"version": report["version"], "promote": report["promote"]}))


if __name__ == "__main__":
    main()
