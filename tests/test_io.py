"""Checkpoint reading and the expert-directory round trip (atomic writes: tests/test_atomic_writes.py)."""

import os

import torch

from safemerge.io import Expert, expert_info, load_tensors, read_expert, save_tensors, write_expert


def test_tensor_pickles_and_safetensors_load(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    save_tensors(tmp_path / "w.safetensors", state)
    for name in ("w.pt", "w.safetensors"):
        loaded = load_tensors(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def _expert(tmp_path):
    info = expert_info(
        model="TinyCLIP-ViT-32",
        pretrained=None,
        task="digits",
        num_classes=10,
        backdoor=None,
        metrics={"accuracy": 0.9, "asr": None},
    )
    return write_expert(tmp_path / "expert", Expert(encoder={"w": torch.ones(3)}, info=info))


def test_expert_round_trip(tmp_path):
    directory = _expert(tmp_path)
    expert = read_expert(directory)
    assert expert.task == "digits" and torch.equal(expert.encoder["w"], torch.ones(3))
    assert expert.trigger is None
    assert sorted(os.listdir(tmp_path)) == ["expert"]  # no temporary folder left behind


# Broken and hostile checkpoints and expert directories: tests/test_hostile_checkpoints.py
