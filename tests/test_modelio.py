"""Model files are read with weights_only: plain data and tensors load, a payload never runs."""

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
