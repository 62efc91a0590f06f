"""Safe checkpoint reading, atomic writes, and expert-directory validation."""

import json
import os
import pickle

import pytest
import torch

from safemerge.errors import CheckpointError, UnsafeCheckpointError
from safemerge.io import (
    Expert, expert_info, load_tensors, read_expert, save_tensors, write_expert, write_json,
)

MARKER_ENV = "SAFEMERGE_PWNED_MARKER"


class _RunsCodeOnLoad:
    """Unpickling this calls os.system-like code: the attack a checkpoint can carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_pickle_that_runs_code_is_refused_and_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": _RunsCodeOnLoad(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pt.*safetensors"):
        load_tensors(path)
    assert not marker.exists()


def test_tensor_pickles_and_safetensors_load(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    save_tensors(tmp_path / "w.safetensors", state)
    for name in ("w.pt", "w.safetensors"):
        loaded = load_tensors(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"a": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tensors(path)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"ok": 1})

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"ok": 2})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["report.json"]


def _expert(tmp_path):
    info = expert_info(model="TinyCLIP-ViT-32", pretrained=None, task="digits", num_classes=10,
                       backdoor=None, metrics={"accuracy": 0.9, "asr": None})
    return write_expert(tmp_path / "expert", Expert(encoder={"w": torch.ones(3)}, info=info))


def test_expert_round_trip(tmp_path):
    directory = _expert(tmp_path)
    expert = read_expert(directory)
    assert expert.task == "digits" and torch.equal(expert.encoder["w"], torch.ones(3))
    assert expert.trigger is None
    assert sorted(os.listdir(tmp_path)) == ["expert"]  # no temporary folder left behind


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "encoder.safetensors").unlink(), "missing encoder.safetensors"),
        (lambda d: (d / "expert.json").unlink(), "missing expert.json"),
        (lambda d: (d / "expert.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "encoder.safetensors").write_bytes(b"\x00" * 7), "truncated or corrupt"),
        (lambda d: (d / "expert.json").write_text('{"format": "x"}'), "no valid 'model' field"),
    ],
)
def test_broken_expert_directory_is_a_clear_error(tmp_path, damage, message):
    directory = _expert(tmp_path)
    damage(directory)
    with pytest.raises(CheckpointError, match=message):
        read_expert(directory)
