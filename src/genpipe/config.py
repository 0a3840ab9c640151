"""Typed, validated parameters: params.yaml -> frozen pydantic models.

One source of truth. Anything unknown, mistyped or out of range stops the stage before any
work, with the dotted key path (e.g. `tokenizer.codebook_size`) and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message names each bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Base(Section):
    seed: int = Field(0, ge=0, description="seed for every random draw of every stage")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    source: Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"] = "digits"
    source_path: str | None = Field(None, description="folder or download root for the source")


class Prepare(Section):
    train_frac: float = Field(0.7, gt=0, lt=1)
    val_frac: float = Field(0.15, gt=0, lt=1)
    image_size: int = Field(8, ge=4, le=256)
    channels: Literal[1, 3] = 1

    @model_validator(mode="after")
    def _fractions(self) -> Prepare:
        if self.train_frac + self.val_frac >= 1:
            raise ValueError(
                f"train_frac + val_frac must be < 1 to leave a test split "
                f"(got {self.train_frac} + {self.val_frac})"
            )
        return self


class Params(Section):
    base: Base = Base()
    prepare: Prepare = Prepare()

    def section(self, name: str) -> dict[str, Any]:
        """Plain dict of one section (plus `base`), as logged to MLflow and hashed for lineage."""
        return {"base": self.base.model_dump(), name: getattr(self, name).model_dump()}

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections, so a run records exactly which params made it."""
        payload = {s: getattr(self, s).model_dump() for s in sorted({"base", *sections})}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _format_errors(exc: ValidationError, path: Path) -> str:
    lines = [f"{path}: invalid parameters (fix these keys and run again):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo? check the section's allowed keys in README)"
        got_repr = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {key}: {msg}{got_repr}")
    return "\n".join(lines)


def parse_params(raw: Any, path: Path = Path(PARAMS_FILE)) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, path)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, path)
