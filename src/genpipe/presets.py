"""Named, complete parameter sets (`presets/<name>.yaml`) and the switch between them.

A preset is a whole params file, not a patch: every key of the schema is written out, so what
a preset runs never depends on the schema's defaults, and `genpipe preset NAME` is a plain copy
into params.yaml. DVC then sees the switch like any other params edit (`base.preset` names the
preset in params.yaml, dvc.lock and `dvc exp show`). `auto` derives a preset for another image
size from the tuned ones, by the rules of thumb in the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from genpipe.config import Params, ParamsError, parse_params

PRESETS_DIR = Path("presets")
MAX_GRID = 8  # grid side the auto rule aims for: the AR prior is tuned for <= 64 positions


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / PRESETS_DIR).glob("*.yaml"))


def preset_path(name: str, root: Path = Path(".")) -> Path:
    path = root / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(root)) or "none"
        raise ParamsError(
            f"{path}: no preset {name!r}; available: {names} "
            "(or `genpipe preset auto --image-size N`)"
        )
    return path


def missing_keys(
    raw: dict[str, Any], model: type[BaseModel] = Params, prefix: str = ""
) -> list[str]:
    """Dotted keys of the schema that `raw` leaves to a default (recursing into sections)."""
    out = []
    for key, field in model.model_fields.items():
        dotted = f"{prefix}{key}"
        if key not in raw:
            out.append(dotted)
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(raw[key], dict):
            out += missing_keys(raw[key], sub, f"{dotted}.")
    return out


def check(raw: Any, path: Path) -> Params:
    """A preset must validate and spell out every key: a schema change that a preset does not
    follow (a new key, a renamed one) fails here, naming the keys, instead of drifting."""
    params = parse_params(raw, path)
    if missing := missing_keys(raw):
        raise ParamsError(
            f"{path}: incomplete preset, add these keys (see params.yaml of another preset): "
            + ", ".join(missing)
        )
    return params


def load(name: str, root: Path = Path(".")) -> tuple[str, Params]:
    """The preset's text (comments kept, for the copy) and its validated params."""
    path = preset_path(name, root)
    text = path.read_text()
    params = check(yaml.safe_load(text), path)
    if params.base.preset != name:
        raise ParamsError(f"{path}: base.preset is {params.base.preset!r}; set it to {name!r}")
    return text, params


def grid_levels(image_size: int) -> int:
    """Halvings that take `image_size` to the largest grid side <= MAX_GRID (at least one)."""
    size, levels = image_size, 0
    while size > MAX_GRID or levels == 0:
        if size % 2:
            raise ParamsError(
                f"--image-size {image_size}: halving it reaches {size}, which is odd and still "
                f"above a {MAX_GRID}x{MAX_GRID} grid; pick a size such as "
                f"{_nearest_fit(image_size)}, or write a preset by hand"
            )
        size, levels = size // 2, levels + 1
    return levels


def _nearest_fit(image_size: int) -> str:
    fits = [s for s in range(4, 2 * image_size + 8) if _fits(s)]
    return " or ".join(str(s) for s in sorted(fits, key=lambda s: abs(s - image_size))[:2])


def _fits(size: int) -> bool:
    levels = 0
    while size > MAX_GRID or levels == 0:
        if size % 2:
            return False
        size, levels = size // 2, levels + 1
    return size >= 2


def derive(
    image_size: int, channels: int, source: str, root: Path = Path(".")
) -> tuple[dict[str, Any], str]:
    """A preset for `image_size` from a tuned one: the grid side is brought to <= MAX_GRID with
    one more tokenizer level per halving (widths 32, 64, 128, then 128), so the prior sees at
    most 64 positions, for which the `mnist` prior, judges and budgets were tuned. Images of
    at most 8 pixels (16 positions or fewer) take the `digits` sizes instead."""
    levels = grid_levels(image_size)
    grid = image_size // 2**levels
    template = "digits" if image_size <= MAX_GRID else "mnist"
    raw = yaml.safe_load(preset_path(template, root).read_text())
    raw["base"].update(preset="auto", source=source)
    raw["prepare"].update(image_size=image_size, channels=channels)
    raw["tokenizer"]["channels"] = [min(32 * 2**i, 128) for i in range(levels + 1)]
    check(raw, Path(f"preset auto (from {template})"))
    note = (
        f"{image_size}x{image_size}x{channels} images -> {grid}x{grid} grid ({grid * grid} codes) "
        f"with tokenizer.channels {raw['tokenizer']['channels']}; every other value is the "
        f"`{template}` preset's, tuned for {'4x4' if template == 'digits' else '7x7'} grids "
        "on a 2-core CPU: untuned here, measure it (README: presets / other image sizes)"
    )
    return raw, note


def diff(current: Any, reference: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two raw params mappings."""
    if isinstance(current, dict) and isinstance(reference, dict):
        out = []
        for key in sorted(set(current) | set(reference), key=str):
            out += diff(current.get(key), reference.get(key), f"{prefix}{key}.")
        return out
    return [] if current == reference else [prefix.rstrip(".")]


def reference(raw: dict[str, Any], root: Path = Path(".")) -> dict[str, Any]:
    """The preset a params mapping names, as a raw mapping (auto: re-derived from its size)."""
    params = parse_params(raw)
    if params.base.preset == "auto":
        p = params.prepare
        return derive(p.image_size, p.channels, params.base.source, root)[0]
    return yaml.safe_load(preset_path(params.base.preset, root).read_text())
