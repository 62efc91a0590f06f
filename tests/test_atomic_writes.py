"""Atomic writes, interrupted inside the write: the old file survives byte for byte and no
temporary file or folder is left beside it.

Each interruption happens after bytes have reached the disk (a partial file, then an error),
or at the final rename, so a writer that writes straight to the target, or one that does not
clean up its temporary on failure, fails here.
"""

import os
from pathlib import Path

import pytest
import torch

from safemerge import io
from safemerge.io import Expert, atomic_path, expert_info, save_tensors, write_expert, write_json, write_text


class Interrupted(Exception):
    pass


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), hidden ones included."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def partial_text_write(monkeypatch):
    """``Path.write_text`` writes half its text, then the process is 'interrupted'."""

    def write(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise Interrupted

    monkeypatch.setattr(Path, "write_text", write)


def failing_replace(monkeypatch, fail_when=lambda src, dst: True):
    real = os.replace

    def replace(src, dst):
        if fail_when(Path(src), Path(dst)):
            raise Interrupted
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)


@pytest.mark.parametrize(
    "write",
    [
        lambda path: write_text(path, "new text that is long enough to be cut in half\n"),
        lambda path: write_json(path, {"ok": 2, "padding": "x" * 64}),
    ],
    ids=["write_text", "write_json"],
)
@pytest.mark.parametrize("interrupt", [partial_text_write, failing_replace], ids=["inside-the-write", "at-the-rename"])
def test_an_interrupted_text_write_keeps_the_old_file_and_leaves_no_temporary(write, interrupt, tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"ok": 1})
    before = path.read_bytes()
    interrupt(monkeypatch)
    with pytest.raises(Interrupted):
        write(path)
    assert path.read_bytes() == before
    assert entries(tmp_path) == ["report.json"]


def test_a_text_write_replaces_the_file_once_complete(tmp_path):
    path = tmp_path / "a" / "report.json"
    write_json(path, {"ok": 1})
    write_json(path, {"ok": 2})
    assert path.read_text() == '{\n  "ok": 2\n}\n'
    assert entries(path.parent) == ["report.json"]


def partial_safetensors(monkeypatch):
    """``save_file`` writes the first bytes of a real safetensors file, then is interrupted."""
    real = io.save_file

    def save(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise Interrupted

    monkeypatch.setattr(io, "save_file", save)


@pytest.mark.parametrize("interrupt", [partial_safetensors, failing_replace], ids=["inside-the-write", "at-the-rename"])
def test_an_interrupted_save_tensors_keeps_the_old_file_and_leaves_no_temporary(interrupt, tmp_path, monkeypatch):
    path = tmp_path / "learned.safetensors"
    save_tensors(path, {"w": torch.zeros(64)})
    before = path.read_bytes()
    interrupt(monkeypatch)
    with pytest.raises(Interrupted):
        save_tensors(path, {"w": torch.arange(64.0)})
    assert path.read_bytes() == before
    assert entries(tmp_path) == ["learned.safetensors"]


@pytest.mark.parametrize("where", ["inside-the-block", "at-the-rename"])
def test_atomic_path_removes_its_temporary_when_the_block_or_the_rename_fails(where, tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    if where == "at-the-rename":
        failing_replace(monkeypatch)
    with pytest.raises(Interrupted), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path  # beside the target, not the target
        tmp.write_bytes(b"partial new content")
        if where == "inside-the-block":
            raise Interrupted
    assert path.read_bytes() == b"old"
    assert entries(tmp_path) == ["out.bin"]


def _expert(value: float, trigger: bool = True) -> Expert:
    info = expert_info(
        model="TinyCLIP-ViT-32",
        pretrained=None,
        task="digits",
        num_classes=10,
        backdoor=None,
        metrics={"accuracy": value, "asr": None},
    )
    return Expert(
        encoder={"w": torch.full((256,), value)},
        info=info,
        trigger={"pattern": torch.full((3, 4, 4), value)} if trigger else None,
    )


def test_an_expert_interrupted_while_its_encoder_is_written_leaves_the_old_expert_intact(tmp_path, monkeypatch):
    directory = write_expert(tmp_path / "expert", _expert(0.5))
    before = snapshot(directory)
    partial_safetensors(monkeypatch)
    with pytest.raises(Interrupted):
        write_expert(directory, _expert(0.9))
    assert snapshot(directory) == before
    assert entries(tmp_path) == ["expert"]


@pytest.mark.parametrize("rename", ["the old one aside", "the new one into place"])
def test_an_expert_whose_rename_fails_leaves_the_old_expert_intact(rename, tmp_path, monkeypatch):
    """Replacing an expert takes two renames (old aside, new in): whichever fails, the old
    expert is still at its path, whole, and nothing else is left."""
    directory = write_expert(tmp_path / "expert", _expert(0.5))
    before = snapshot(directory)
    if rename == "the old one aside":
        failing_replace(monkeypatch, lambda src, dst: src == directory)
    else:
        failing_replace(monkeypatch, lambda src, dst: dst == directory and src.name.endswith(".tmp"))
    with pytest.raises(Interrupted):
        write_expert(directory, _expert(0.9, trigger=False))
    assert snapshot(directory) == before
    assert entries(tmp_path) == ["expert"]


def test_a_replaced_expert_is_the_new_one_with_no_file_of_the_old_left(tmp_path):
    directory = write_expert(tmp_path / "expert", _expert(0.5))
    write_expert(directory, _expert(0.9, trigger=False))
    assert entries(directory) == [io.ENCODER_FILE, io.EXPERT_FILE]  # the old trigger is gone with the old expert
    assert torch.equal(io.read_expert(directory).encoder["w"], torch.full((256,), 0.9))
    assert entries(tmp_path) == ["expert"]
