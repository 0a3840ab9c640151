"""Model files are read with weights_only: plain data and tensors load, a payload never runs."""

from pathlib import Path

import pytest
import torch
from torch import nn

from genpipe.modelio import ModelFileError, load_model, read_model_file, save_model


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_round_trip_with_the_plain_data_stages_record(tmp_path):
    model = nn.Linear(3, 2)
    arch = {"in_features": 3, "out_features": 2}
    extra = {"grid": (4, 4), "sampling": {"top_k": None, "cfg_scale": 2.0}, "prior_kind": "ar"}
    save_model(tmp_path / "m.pt", "linear", arch, model, **extra)
    loaded, blob = load_model(tmp_path / "m.pt", "linear", nn.Linear, expect_arch=arch)
    assert torch.equal(loaded.weight, model.weight) and blob["extra"] == extra


def test_a_pickle_with_a_payload_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran.txt"
    bad = tmp_path / "prior.pt"
    blob = {"kind": "prior", "arch": {}, "state_dict": {}, "extra": {"x": Payload(marker)}}
    torch.save(blob, bad)
    with pytest.raises(ModelFileError, match=r"prior.pt: refused: .*\(exec\)"):
        read_model_file(bad, "prior")
    assert not marker.exists()
    # the payload is real: an unrestricted load runs it
    torch.load(bad, weights_only=False)
    assert marker.read_text() == "ran"


def test_garbage_is_unreadable_without_advice_to_drop_the_safeguard(tmp_path):
    bad = tmp_path / "m.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ModelFileError, match="m.pt: unreadable model file") as err:
        read_model_file(bad, "linear")
    assert "weights_only" not in str(err.value)


class Pair(nn.Module):
    """Several outputs, as the tokenizer has: exportable, not servable as one tensor."""

    def forward(self, x):
        return x * 2, x.sum()


class Signed(nn.Module):
    """A branch on the data: torch.export cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_stage_models_are_logged_as_exported_programs_not_pickles(mlflow_uri, caplog, tmp_path):
    import logging

    import mlflow
    import numpy as np

    from genpipe.models.classifier import Classifier
    from genpipe.tracking import store
    from genpipe.tracking.write import StageRun

    records: list[str] = []
    seen = logging.Handler(logging.WARNING)
    seen.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mlflow").addHandler(seen)  # MLflow's loggers do not propagate
    judge = Classifier("mlp", in_channels=1, image_size=8, num_classes=3, width=8).eval()
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    try:
        with store.mlflow().start_run() as run, caplog.at_level(logging.WARNING):
            handle = StageRun(mlflow, run.info.run_id, "test")
            exported = handle.log_torch_model(judge, "judge", x)
            handle.log_torch_model(Pair(), "pair", x)
            warned_for_exported = list(records)
            pickled = handle.log_torch_model(Signed(), "signed", x)
    finally:
        logging.getLogger("mlflow").removeHandler(seen)
    saved = Path(mlflow.artifacts.download_artifacts(exported, dst_path=str(tmp_path / "a")))
    assert [p.name for p in (saved / "data").iterdir()] == ["model.pt2"]
    assert warned_for_exported == [], warned_for_exported  # no pickle or serving warnings
    loaded = mlflow.pytorch.load_model(exported)
    with torch.no_grad():
        assert torch.equal(loaded(torch.from_numpy(x)), judge(torch.from_numpy(x)))
    # what torch.export cannot trace is still logged, in pickle format, saying why
    assert "model signed: torch.export cannot trace it" in caplog.text
    saved = Path(mlflow.artifacts.download_artifacts(pickled, dst_path=str(tmp_path / "b")))
    assert (saved / "data" / "model.pth").is_file()
