"""Tiny params for pipeline tests: every stage runs for real, for seconds."""

from pathlib import Path

import yaml

OVERRIDES = {
    "pretrain": {"optim": {"steps": 10, "batch_size": 64}},
    "judges": {
        "reward": {"optim": {"steps": 60}},
        "evaluator": {"optim": {"steps": 60}},
    },
    "tokenizer": {"optim": {"steps": 60, "checkpoint_every": 0}},
    "prior": {
        "dim": 32,
        "depth": 1,
        "heads": 2,
        "samples_per_class": 4,
        "optim": {"steps": 40, "checkpoint_every": 0},
    },
    "finetune": {
        "steps": 2,
        "prompts_per_step": 4,
        "group_size": 4,
        "eval_samples_per_class": 4,
        "checkpoint_every": 0,
    },
    "evaluate": {"samples_per_class": 8},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge(base.get(k, {}), v)
            if isinstance(v, dict) and isinstance(base.get(k), dict)
            else v
        )
    return out


def write_tiny_params(repo: Path, extra: dict | None = None) -> None:
    edit_params(repo, merge(OVERRIDES, extra or {}))


def edit_params(repo: Path, changes: dict) -> None:
    """Merge `changes` into the repo's params.yaml, leaving every other value as it is."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, changes), sort_keys=False))
