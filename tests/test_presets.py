"""Presets: complete params files that `genpipe preset` copies into params.yaml."""

import shutil
from pathlib import Path

import pytest
import yaml

from genpipe import presets
from genpipe.cli import main
from genpipe.config import ParamsError, load_params
from tests.tiny import write_tiny_params

REPO = Path(__file__).resolve().parents[1]


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", presets.available(REPO))
def test_every_preset_is_valid_complete_and_names_itself(name):
    _, params = presets.load(name, REPO)
    assert params.base.preset == name


def test_the_shipped_presets_exist():
    assert {"digits", "mnist", "tiny"} <= set(presets.available(REPO))


def test_params_yaml_is_the_preset_it_names():
    current = raw(REPO / "params.yaml")
    assert presets.diff(current, presets.reference(current, REPO)) == []


def test_a_key_missing_from_a_preset_is_named(tmp_path):
    (tmp_path / "presets").mkdir()
    broken = raw(REPO / "presets" / "digits.yaml")
    del broken["tokenizer"]["optim"]["lr"], broken["base"]["source_path"]
    (tmp_path / "presets" / "digits.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ParamsError, match=r"incomplete preset.*tokenizer\.optim\.lr") as err:
        presets.load("digits", tmp_path)
    assert "base.source_path" in str(err.value)


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_preset_command_switches_params_and_reports_drift(project, capsys):
    assert main(["preset", "mnist"]) == 0
    params = load_params(project / "params.yaml")
    assert (params.base.preset, params.base.source, params.prepare.image_size) == (
        "mnist",
        "mnist",
        28,
    )
    assert (project / "params.yaml").read_text() == (project / "presets/mnist.yaml").read_text()
    assert "data/raw holds nothing" in capsys.readouterr().out
    assert main(["preset"]) == 0
    assert "follows preset 'mnist', unchanged" in capsys.readouterr().out
    edited = raw(project / "params.yaml")
    edited["prior"]["depth"] = 9
    (project / "params.yaml").write_text(yaml.safe_dump(edited))
    assert main(["preset"]) == 0
    assert "differs at: prior.depth" in capsys.readouterr().out


def test_unknown_preset_lists_the_available_ones(project, capsys):
    before = (project / "params.yaml").read_text()
    assert main(["preset", "mnsit"]) == 2
    assert "available: digits, mnist, tiny" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before


@pytest.mark.parametrize(
    ("size", "channels", "grid"),
    [
        (8, [32, 64], 4),
        (28, [32, 64, 128], 7),
        (32, [32, 64, 128], 8),
        (64, [32, 64, 128, 128], 8),
        (96, [32, 64, 128, 128, 128], 6),
    ],
)
def test_auto_preset_brings_the_grid_to_at_most_8(project, capsys, size, channels, grid):
    assert main(["preset", "auto", "--image-size", str(size), "--channels", "3"]) == 0
    params = load_params(project / "params.yaml")
    assert params.tokenizer.channels == channels
    assert size // params.tokenizer.downsample == grid
    assert (params.base.preset, params.prepare.image_size, params.prepare.channels) == (
        "auto",
        size,
        3,
    )
    assert f"{grid}x{grid} grid" in capsys.readouterr().out
    assert (
        presets.diff(raw(project / "params.yaml"), presets.reference(raw(project / "params.yaml")))
        == []
    )


def test_auto_preset_refuses_a_size_it_cannot_halve_and_suggests_one(project, capsys):
    assert main(["preset", "auto", "--image-size", "30"]) == 2
    assert "pick a size such as 28 or 32" in capsys.readouterr().err


def test_tiny_params_of_the_tests_are_the_tiny_preset(tmp_path):
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    write_tiny_params(tmp_path, {"prior": {"kind": "diffusion"}})
    written = raw(tmp_path / "params.yaml")
    assert presets.diff(written, raw(REPO / "presets" / "tiny.yaml")) == ["prior.kind"]
