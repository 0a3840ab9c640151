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
        ({"base": {"device": "tpu"}}, "base.device", "'auto', 'cpu', 'cuda' or 'mps'"),
        (
            {"prepare": {"train_frac": 0.9, "val_frac": 0.1}},
            "prepare.val_frac",
            "leave a test split",
        ),
        ({"tokenizer": {"channels": [8, 8, 8, 8]}}, "tokenizer.channels", "prepare.image_size"),
        ({"tokenizer": {"code_dim": 100}}, "tokenizer.code_dim", "must not exceed"),
        ({"tokenizer": {"optim": {"lr": -1.0}}}, "tokenizer.optim.lr", "greater than 0"),
        ({"nosuchstage": {}}, "nosuchstage", "unknown key"),
        ({"prior": {"steps_by_kind": {"diffusoin": 10}}}, "prior.steps_by_kind", "unknown prior"),
        ({"prior": {"steps_by_kind": {"ar": 0}}}, "prior.steps_by_kind.ar", "at least 1"),
        ({"prior": {"cfg_by_kind": {"diffusoin": 1.0}}}, "prior.cfg_by_kind", "unknown prior"),
        ({"prior": {"cfg_by_kind": {"ar": -1.0}}}, "prior.cfg_by_kind.ar", ">= 0"),
        (
            {"prior": {"kind": "maskgit", "steps_by_kind": {"ar": 10}}},
            "prior.steps_by_kind",
            "no entry for kind 'maskgit'",
        ),
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


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as a string; DVC (YAML 1.2) and users read a float."""
    path = tmp_path / "params.yaml"
    path.write_text("tokenizer:\n  optim:\n    lr: 1e-4\nfinetune:\n  lr: 5E-5\n")
    params = load_params(path)
    assert params.tokenizer.optim.lr == 1e-4 and params.finetune.lr == 5e-5
    path.write_text("tokenizer:\n  optim:\n    steps: 1e3\n")  # an int knob stays an int
    with pytest.raises(ParamsError, match=r"- tokenizer.optim.steps: .*valid integer"):
        load_params(path)
    path.write_text("tokenizer:\n  optim:\n    lr: '1e-4'\n")  # quoted is still a string
    with pytest.raises(ParamsError, match=r"- tokenizer.optim.lr: .*valid number"):
        load_params(path)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("prior:\n  temperature: .inf\n", "prior.temperature"),
        ("finetune:\n  kl_bound: .inf\n", "finetune.kl_bound"),
        ("tokenizer:\n  optim:\n    lr: .nan\n", "tokenizer.optim.lr"),
        ("prior:\n  top_p: .nan\n", "prior.top_p"),
        (
            "finetune:\n  rewards:\n    class_confidence: -.inf\n",
            "finetune.rewards.class_confidence",
        ),
        ("tokenizer:\n  beta: .NaN\n", "tokenizer.beta"),
    ],
)
def test_inf_and_nan_are_refused_with_the_dotted_key(tmp_path, yaml_text, key):
    path = tmp_path / "params.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ParamsError, match=rf"- {key}: Input should be a finite number"):
        load_params(path)


def test_prior_steps_follow_the_kind_unless_given():
    """`prior.optim.steps: null` trains each kind for its own steps (diffusion needs ~3x AR's,
    measured); a number applies to whichever kind runs, and is what training reads."""
    by_kind = {"ar": 800, "diffusion": 2400, "maskgit": 700}
    for kind, steps in by_kind.items():
        prior = parse_params({"prior": {"kind": kind, "steps_by_kind": by_kind}}).prior
        assert prior.optim.steps is None
        assert prior.train_steps == steps and prior.train_optim.steps == steps
    fixed = {"kind": "diffusion", "steps_by_kind": by_kind, "optim": {"steps": 300}}
    prior = parse_params({"prior": fixed}).prior
    assert prior.train_steps == 300 and prior.train_optim.steps == 300
    assert prior.train_optim.lr == prior.optim.lr  # the other knobs pass through
