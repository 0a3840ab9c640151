"""dvc.yaml, written from the stage specs so each stage is declared once (genpipe.stages).

Data deps, params and outputs come from each stage's `SPEC`; code deps are computed: the
stage module and every project module it imports, followed transitively through the source
(imports under `if TYPE_CHECKING:` do not run and do not count; a package's __init__ counts
for every module imported from it; a package that finds its modules with
`pkgutil.iter_modules(__path__)`, as models/priors does, imports all of them). Imports inside
a params validator (config's check of prior kinds and reward names) do not count: they can
refuse a params file but never change what a stage writes, and counting them would tie every
stage to every prior kind and reward. A spec's `entry_points` add the user's own modules
named in params.yaml (custom rewards). `genpipe dvc-yaml` writes the file, `--check` fails
when it is out of date (a test runs the check).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import yaml

from genpipe.config import PARAMS_FILE, Params, load_params
from genpipe.spec import StageSpec
from genpipe.stages import STAGES, load

PACKAGE = "genpipe"
SRC = Path("src")
CMD = "PYTHONPATH=src python -m flows.stage {name}"
HEADER = """\
# The genpipe DAG, written by `genpipe dvc-yaml` from the stage specs (src/genpipe/stages/*.py):
# edit a spec and re-run it, not this file. Each cmd is the Prefect flow around one stage
# (flows/stage.py); PYTHONPATH=src makes a stage run this checkout's code (also in
# `dvc exp run --temp` copies). Code deps: every module a stage imports, transitively.
"""
LOSS_CURVES = {
    "pretrain": "plots/pretrain/loss.csv",
    "judges": ["plots/judges/loss_reward.csv", "plots/judges/loss_evaluator.csv"],
    "tokenizer": "plots/tokenizer/loss.csv",
    "prior": "plots/prior/loss.csv",
}


def _curve(title: str, files: str | list[str], y: str | list[str], **extra: str) -> Any:
    files = [files] if isinstance(files, str) else files
    return {title: {"template": "linear", "x": "step", "y": dict.fromkeys(files, y), **extra}}


# Each figure is defined once, here; stage outputs under plots/ are plain uncached outs, so
# `dvc plots show` does not draw a stage's files a second time with its default template.
PLOTS: list[Any] = [
    *(_curve(f"{stage} loss", f, "loss") for stage, f in LOSS_CURVES.items()),
    _curve("finetune reward", "plots/finetune/reward.csv", ["reward_mean", "reward_mean_window"]),
    _curve("finetune KL against kl_bound", "plots/finetune/reward.csv", ["kl_window", "kl_bound"]),
    *(
        {
            f"judge {role}: confusion on test": {
                "template": "confusion",
                "x": "predicted",
                "y": {f"plots/judges/confusion_{role}.csv": "actual"},
            }
        }
        for role in ("reward", "evaluator")
    ),
    {
        "tokenizer codebook usage (test codes)": {
            "template": "bar_horizontal_sorted",
            "x": "count",
            "y": {"plots/tokenizer/codebook_usage.csv": "code"},
        }
    },
    "plots/tokenizer/recon_test.png",
    "plots/pretrain/features_pca.png",
    "plots/prior/samples.png",
    "plots/finetune/samples_after.png",
    "plots/evaluate/samples_base.png",
    "plots/evaluate/samples_finetuned.png",
]


def module_path(module: str, src: Path) -> Path | None:
    """The source file of a project module (relative to `src`'s parent), or None."""
    base = src / Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runs(node: ast.If) -> bool:
    """False for `if TYPE_CHECKING:` blocks, which never run."""
    test = node.test
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return name != "TYPE_CHECKING"


def _validates(node: ast.FunctionDef) -> bool:
    """A pydantic validator (`@field_validator(...)`, `@model_validator(...)`)."""
    names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
    return any(n in ("field_validator", "model_validator") for n in names)


def _discovers_modules(node: ast.AST) -> bool:
    """`pkgutil.iter_modules(__path__)`: a package importing its modules by their names."""
    return (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) == "pkgutil.iter_modules"
        and [ast.unparse(a) for a in node.args] == ["__path__"]
    )


def imported_modules(path: Path, module: str) -> set[str]:
    """Project modules `path` (module `module`) imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and not _runs(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.FunctionDef) and _validates(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif _discovers_modules(node):
            found.update(
                f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"
            )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def code_deps(module: str, src: Path = SRC) -> list[Path]:
    """Source files of `module` and of every project module it imports, transitively, with
    the __init__ of every package on the way."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen or (path := module_path(prefix, src)) is None:
                continue
            seen[prefix] = path
            todo.extend(imported_modules(path, prefix))
    return sorted(seen.values())


def entry_point_files(spec: StageSpec, params: Params | None, root: Path) -> list[Path]:
    """Source files of the user modules named by `spec.entry_points` in params.yaml (as
    rewards.load_entry_point imports them: from the project root)."""
    if spec.entry_points is None or params is None:
        return []
    entries = params.pick(spec.entry_points)[spec.entry_points]
    modules = sorted({value.partition(":")[0] for value in entries.values()})
    return [p for m in modules if (p := module_path(m, root)) is not None]


def stage_entry(
    spec: StageSpec, root: Path = Path("."), params: Params | None = None
) -> dict[str, Any]:
    modules = code_deps(f"{PACKAGE}.stages.{spec.name}", root / SRC)
    modules += entry_point_files(spec, params, root)
    code = [p.relative_to(root).as_posix() for p in modules]
    entry: dict[str, Any] = {
        "cmd": CMD.format(name=spec.name),
        "deps": [*(d.as_posix() for d in spec.deps), *code],
        "params": ["base", *spec.params],
    }
    outs: list[Any] = [
        p.as_posix() if spec.cache else {p.as_posix(): {"cache": False}} for p in spec.outs
    ]
    if spec.plots is not None:  # drawn by the top-level PLOTS only (each figure once)
        outs.append({spec.plots.as_posix(): {"cache": False}})
    if outs:
        entry["outs"] = outs
    if spec.metrics is not None:
        entry["metrics"] = [{spec.metrics.as_posix(): {"cache": False}}]
    return entry


def render(root: Path = Path(".")) -> str:
    """dvc.yaml for the project at `root` (its code deps read from root/src, entry points
    from root/params.yaml)."""
    params = load_params(root / PARAMS_FILE) if (root / PARAMS_FILE).is_file() else None
    stages = {name: stage_entry(load(name).SPEC, root, params) for name in STAGES}
    body = yaml.safe_dump(
        {"stages": stages, "plots": PLOTS}, sort_keys=False, default_flow_style=False, width=100
    )
    return HEADER + body


def write(path: Path = Path("dvc.yaml"), check: bool = False) -> bool:
    """Write dvc.yaml from the specs; with `check`, only say whether it is up to date."""
    text = render(path.parent)
    current = path.read_text() if path.is_file() else None
    if not check and current != text:
        path.write_text(text)
    return current == text
