from pathlib import Path

import pytest
import yaml

from genpipe.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.base.source == "digits"
    assert params.prepare.train_frac + params.prepare.val_frac < 1


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"prepare": {"trian_frac": 0.5}}, "prepare.trian_frac", "unknown key"),
        ({"base": {"seed": "7"}}, "base.seed", "valid integer"),
        ({"prepare": {"image_size": 2}}, "prepare.image_size", "greater than or equal to 4"),
        ({"base": {"device": "tpu"}}, "base.device", "'auto', 'cpu' or 'cuda'"),
        (
            {"prepare": {"train_frac": 0.9, "val_frac": 0.1}},
            "prepare.val_frac",
            "leave a test split",
        ),
        ({"tokenizer": {"channels": [8, 8, 8, 8]}}, "tokenizer.channels", "prepare.image_size"),
        ({"tokenizer": {"code_dim": 100}}, "tokenizer.code_dim", "must not exceed"),
        ({"tokenizer": {"optim": {"lr": -1.0}}}, "tokenizer.optim.lr", "greater than 0"),
        ({"nosuchstage": {}}, "nosuchstage", "unknown key"),
    ],
)
def test_bad_values_name_the_key(raw, key, hint):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert f"- {key}:" in str(err.value)
    assert hint in str(err.value)


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception, match="frozen"):
        params.base.seed = 3  # type: ignore[misc]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="mapping of sections"):
        load_params(bad)


def test_digest_depends_only_on_named_sections():
    a = parse_params({"prepare": {"image_size": 8}})
    b = parse_params({"prepare": {"image_size": 16}})
    assert a.digest("prepare") != b.digest("prepare")
    assert a.digest() == b.digest()  # base alone is unchanged


def test_bad_params_stop_the_stage_cli_before_work(tmp_path, monkeypatch):
    from genpipe.cli import main

    (tmp_path / "params.yaml").write_text("prepare:\n  image_size: 1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "prepare"]) == 2
    assert not (tmp_path / "data").exists()
