"""The shape of the code, checked by reading it: stages share only files, dvc.yaml says what
each stage reads (data, params and every module it imports), the two tracking sides meet
only in the store."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from genpipe import dvcyaml
from genpipe.config import ParamsError, parse_params
from genpipe.stages import STAGES, load

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGE_FILES = sorted((SRC / "genpipe/stages").glob("*.py"))
ABOVE_STAGES = {"genpipe.cli", "genpipe.dvcyaml"}  # entry points that name stages


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    return dvcyaml.imported_modules(path, _module(path))


def test_no_stage_imports_another_stage():
    for path in STAGE_FILES:
        own = _module(path)
        siblings = {m for m in _imports(path) if m.startswith("genpipe.stages.") and m != own}
        assert not siblings, f"{path.name} imports {siblings}"


def test_nothing_below_the_stages_imports_them():
    for path in sorted(SRC.rglob("*.py")):
        module = _module(path)
        if module.startswith("genpipe.stages") or module in ABOVE_STAGES:
            continue
        found = {
            m for m in _imports(path) if m == "genpipe.stages" or m.startswith("genpipe.stages.")
        }
        assert not found, f"{module} imports {found}"


def test_tracking_sides_meet_only_in_the_store():
    tracking = SRC / "genpipe/tracking"
    assert "genpipe.tracking.read" not in _imports(tracking / "write.py")
    assert "genpipe.tracking.write" not in _imports(tracking / "read.py")


def test_import_walk_follows_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "src/genpipe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub/__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom genpipe.sub import b\n"
        "if TYPE_CHECKING:\n    from genpipe import hidden\n"
        "def f():\n    from . import late\n"
    )
    (pkg / "sub/b.py").write_text("import genpipe.c\n")
    for name in ("c", "hidden", "late"):
        (pkg / f"{name}.py").write_text("")
    found = {
        p.relative_to(tmp_path).as_posix() for p in dvcyaml.code_deps("genpipe.a", tmp_path / "src")
    }
    assert found == {
        "src/genpipe/__init__.py",
        "src/genpipe/a.py",
        "src/genpipe/sub/__init__.py",
        "src/genpipe/sub/b.py",
        "src/genpipe/c.py",
        "src/genpipe/late.py",
    }


def test_dvc_yaml_is_written_from_the_stage_specs():
    """`genpipe dvc-yaml` regenerates it; an edit to a spec or an import shows up here."""
    assert (REPO / "dvc.yaml").read_text() == dvcyaml.render(REPO), "run `genpipe dvc-yaml`"


def test_code_deps_cover_what_each_stage_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        deps = set(stages[name]["deps"])
        walked = dvcyaml.code_deps(f"genpipe.stages.{name}", SRC)
        assert {p.relative_to(REPO).as_posix() for p in walked} <= deps
    training = {n for n in STAGES if "src/genpipe/training.py" in stages[n]["deps"]}
    assert training == {"pretrain", "judges", "tokenizer", "prior", "finetune"}
    for name in ("prior", "finetune", "evaluate", "register"):  # they build priors by kind
        deps = stages[name]["deps"]
        assert {"src/genpipe/generator.py", "src/genpipe/models/priors/ar.py"} <= set(deps)
        assert "src/genpipe/models/priors/diffusion.py" in deps


def test_params_in_dvc_yaml_are_the_specs_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in STAGES:
        assert stages[name]["params"] == ["base", *load(name).SPEC.params]
    assert "prepare" in stages["pretrain"]["params"] and "prepare" in stages["judges"]["params"]


def _params_read(path: Path) -> set[str]:
    """`params.<section>[.<key>]` chains a stage module spells out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "params"
            and node.attr not in ("digest", "pick")
        ):
            found.add(node.attr)
    return found


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_reads_only_declared_params(name):
    spec = load(name).SPEC
    declared = {"base", *(k.split(".")[0] for k in spec.params)}
    assert _params_read(SRC / f"genpipe/stages/{name}.py") <= declared


def test_a_stage_reading_an_undeclared_section_is_refused():
    view = load("prior").SPEC.view(parse_params({}))
    assert view.prior.kind == "ar" and view.base.seed == 0
    with pytest.raises(ParamsError, match="stage prior reads params `finetune`"):
        _ = view.finetune
    pretrain = load("pretrain").SPEC.view(parse_params({}))
    assert pretrain.tokenizer.channels == [32, 64]
    with pytest.raises(ParamsError, match="reads params `tokenizer.codebook_size`"):
        _ = pretrain.tokenizer.codebook_size


def test_reward_entry_points_become_finetune_code_deps(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def ink(images, labels):\n    return images.mean()\n")
    (tmp_path / "params.yaml").write_text(
        "finetune:\n  rewards: {ink: 1.0}\n  reward_entry_points: {ink: 'my_rewards:ink'}\n"
    )
    (tmp_path / "src").symlink_to(SRC)
    stages = yaml.safe_load(dvcyaml.render(tmp_path))["stages"]
    assert "my_rewards.py" in stages["finetune"]["deps"]
    assert "my_rewards.py" not in stages["evaluate"]["deps"]
