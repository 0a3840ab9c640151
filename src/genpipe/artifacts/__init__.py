"""Every stage output another stage reads: its path here, its loader in the submodule named
after it (encoder, judges, tokenizer, codes, generator).

Stages share files, never code: a stage finds its inputs here, not in the stage that made
them. Paths are relative to the project root; every loader refuses, with the re-run that
fixes it, a file that does not fit. The loaders are split by artifact so that a stage's code
deps (dvc.yaml) name only the model code of what it actually loads.
"""

from __future__ import annotations

from pathlib import Path

from genpipe.data.prepared import PREPARED as PREPARED

RAW = Path("data/raw")
PRETRAIN = Path("models/pretrain")
SSL_ENCODER = PRETRAIN / "encoder.pt"
JUDGES = Path("models/judges")
JUDGE_ROLES = ("reward", "evaluator")
TOKENIZER = Path("models/tokenizer")
TOKENIZER_FILE = TOKENIZER / "model.pt"
CODES = Path("data/codes")
PRIOR = Path("models/prior")
FINETUNE = Path("models/finetune")
PRIOR_FILE = "prior.pt"
PRIORS = {"base": PRIOR, "finetuned": FINETUNE}  # as evaluate and register name them
EVALUATION = Path("metrics/evaluate.json")
REPORT = Path("reports/register")


def metrics(stage: str) -> Path:
    return Path("metrics") / f"{stage}.json"


def plots(stage: str) -> Path:
    return Path("plots") / stage
