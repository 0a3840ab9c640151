"""Stage `tokenize`: every split's images -> integer code grids (N, h, w) with labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpipe import artifacts
from genpipe.artifacts.tokenizer import load_tokenizer
from genpipe.config import Params
from genpipe.data.prepared import SPLITS, load_split
from genpipe.evaluation import batched
from genpipe.outputs import write_json
from genpipe.spec import StageSpec

SPEC = StageSpec(
    "tokenize",
    params=("prepare", "tokenizer"),
    deps=(artifacts.PREPARED, artifacts.TOKENIZER),
    outs=(artifacts.CODES,),
    metrics=artifacts.metrics("tokenize"),
)


def run(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    ctx = SPEC.start(params, root)
    model = load_tokenizer(root / artifacts.TOKENIZER_FILE, params).to(ctx.device)
    data = {s: load_split(s, root / artifacts.PREPARED) for s in SPLITS}
    with SPEC.record(params, root) as (run, (out, metrics_path)):
        summary: dict[str, Any] = {}
        for split, (x, y) in data.items():
            codes = batched(lambda b: model.encode_codes(b.to(ctx.device)).cpu(), x)
            (out / split).mkdir(parents=True)
            np.save(out / split / "codes.npy", codes.numpy().astype(np.int64), allow_pickle=False)
            np.save(out / split / "labels.npy", y.numpy().astype(np.int64), allow_pickle=False)
            summary[f"{split}_count"] = len(codes)
            summary[f"{split}_unique_codes"] = int(torch.unique(codes).numel())
        card = {"codebook_size": model.codebook_size, "grid": list(codes.shape[1:])}
        write_json(out / "card.json", card)
        write_json(metrics_path, {**summary, **card})
        run.log_metrics(summary)
    return summary
