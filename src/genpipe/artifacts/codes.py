"""The `tokenize` output: every split as integer code grids with labels, and its card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpipe.artifacts import CODES
from genpipe.data.raw import DataError


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
