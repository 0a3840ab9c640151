"""Stage `tokenize`: every split's images -> integer code grids (N, h, w) with labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpipe.config import Params
from genpipe.data.prepared import PREPARED, SPLITS, load_split
from genpipe.data.raw import DataError
from genpipe.outputs import staged, write_json
from genpipe.stages import common
from genpipe.stages.tokenizer import OUT as TOKENIZER
from genpipe.stages.tokenizer import load_tokenizer
from genpipe.tracking import write as tracking

CODES = Path("data/codes")
METRICS = Path("metrics/tokenize.json")


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    deps = [PREPARED, TOKENIZER]
    ctx = common.start("tokenize", params, ("prepare", "tokenizer"), deps, root, 0)
    model = load_tokenizer(root / TOKENIZER / "model.pt", params).to(ctx.device)
    data = {s: load_split(s, root / PREPARED) for s in SPLITS}
    with (
        tracking.stage_run(
            "tokenize", params, ("prepare", "tokenizer"), deps, root, outs=[CODES, METRICS]
        ) as run,
        staged(root / CODES, root / METRICS) as (out, metrics_path),
    ):
        summary: dict[str, Any] = {}
        for split, (x, y) in data.items():
            codes = common.batched(lambda b: model.encode_codes(b.to(ctx.device)).cpu(), x)
            (out / split).mkdir(parents=True)
            np.save(out / split / "codes.npy", codes.numpy().astype(np.int64), allow_pickle=False)
            np.save(out / split / "labels.npy", y.numpy().astype(np.int64), allow_pickle=False)
            summary[f"{split}_count"] = len(codes)
            summary[f"{split}_unique_codes"] = int(torch.unique(codes).numel())
        card = {"codebook_size": model.codebook_size, "grid": list(codes.shape[1:])}
        write_json(out / "card.json", card)
        write_json(metrics_path, {**summary, **card})
        run.log_metrics(summary)
        run.write_meta(out)
    return summary


def load_codes(split: str, root: Path = CODES) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Codes (N, h, w), labels (N,) and the card {codebook_size, grid} of one split."""
    try:
        codes = np.load(root / split / "codes.npy", allow_pickle=False)
        labels = np.load(root / split / "labels.npy", allow_pickle=False)
        card = json.loads((root / "card.json").read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: missing; run `dvc repro tokenize`") from None
    if codes.ndim != 3 or len(codes) != len(labels):
        raise DataError(f"{root / split}: codes {codes.shape} and labels {labels.shape} disagree")
    if (
        codes.min() < 0
        or codes.max() >= card["codebook_size"]
        or list(codes.shape[1:]) != card["grid"]
    ):
        raise DataError(
            f"{root / split}/codes.npy: codes outside 0..{card['codebook_size'] - 1} or grid "
            f"{list(codes.shape[1:])} != {card['grid']} in {root / 'card.json'}; "
            "re-run `dvc repro tokenize`"
        )
    return torch.from_numpy(codes), torch.from_numpy(labels), card
