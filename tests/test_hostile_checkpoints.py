"""Hostile and broken checkpoints, in one table: each is refused by the reader that meets it
with a one-line ``safemerge.errors`` exception naming the file, and no code in a checkpoint
ever runs. Symlinks (how hub caches are built) still load.

Each row: how to build the bad input (from a valid tiny expert), which reader is called, the
expected error class (None: it must load) and a regular expression its message must match.
"""

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from safemerge.errors import CheckpointError, SafemergeError, UnknownTaskError, UnsafeCheckpointError
from safemerge.io import Expert, expert_info, load_tensors, read_expert, save_tensors, write_expert
from safemerge.merging import TaskArithmetic
from safemerge.models import load_clip

MODEL = "TinyCLIP-ViT-32"
MARKER = "pwned"  # a file the hostile pickles would create in the test's folder if they ran


class _RunsCode:
    """Unpickling this calls os.system: the attack a pickled checkpoint can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def clip_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return load_clip(MODEL).model.state_dict()


def _expert(tmp: Path, clip_state, *, encoder=None, info=None) -> Path:
    """A valid digits expert of the tiny architecture (random weights), optionally altered."""
    visual = {k.removeprefix("visual."): v for k, v in clip_state.items() if k.startswith("visual.")}
    document = expert_info(
        model=MODEL,
        pretrained=None,
        task="digits",
        num_classes=10,
        backdoor=None,
        metrics={"accuracy": 0.5, "asr": None},
        image_size=32,
    )
    directory = write_expert(
        tmp / "expert", Expert(encoder=visual if encoder is None else encoder(visual), info=document)
    )
    if info is not None:
        (directory / "expert.json").write_text(info(document) if callable(info) else info)
    return directory


def _edit(name: str, change):
    def encoder(state):
        state = dict(state)
        state[name] = change(state[name].clone())
        return state

    return encoder


def _nan(t):
    t.view(-1)[0] = float("nan")
    return t


def _safetensors_bytes(header_change=None, length=None, cut=None) -> bytes:
    """A one-tensor safetensors file (100 float32), its header or length field altered."""
    import safetensors.torch

    data = safetensors.torch.save({"w": torch.ones(100)})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    if header_change:
        header_change(header["w"])
    encoded = json.dumps(header).encode()
    body = struct.pack("<Q", length if length is not None else len(encoded)) + encoded + data[8 + n :]
    return body[:cut] if cut else body


def _file(name: str, content):
    """A builder writing one file: ``content`` is bytes or a function of the marker path."""

    def build(tmp: Path, clip_state) -> Path:
        path = tmp / name
        data = content(tmp / MARKER) if callable(content) else content
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            data(path)
        return path

    return build


def _torch_save(obj_of_marker):
    return lambda marker: lambda path: torch.save(obj_of_marker(marker), path)


def _pickle_dump(obj_of_marker):
    return lambda marker: pickle.dumps(obj_of_marker(marker))


def _pretrained(change):
    """A full-CLIP weights file for load_clip, altered by ``change(state)``."""

    def build(tmp: Path, clip_state) -> Path:
        path = tmp / "weights.safetensors"
        state = dict(clip_state)
        change(state)
        save_tensors(path, state)
        return path

    return build


def _symlinked_expert(tmp: Path, clip_state) -> Path:
    """The layout of a hub cache: snapshots/<rev>/<file> are symlinks to blobs/<hash>."""
    source = _expert(tmp, clip_state)
    snapshot = tmp / "snapshots" / "rev0"
    (tmp / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("encoder.safetensors", "expert.json")):
        blob = tmp / "blobs" / f"blob{i}"
        (source / name).rename(blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def _symlinked_weights(tmp: Path, clip_state) -> Path:
    blob = _pretrained(lambda s: None)(tmp, clip_state).rename(tmp / "blob")
    link = tmp / "model.safetensors"
    link.symlink_to(blob.name)
    return link


def _removed(directory: Path, name: str) -> Path:
    (directory / name).unlink()
    return directory


def _info(change):
    def edit(document):
        document = dict(document)
        change(document)
        return json.dumps(document)

    return edit


def _merge_pool(directory: Path):
    from safemerge.modules import MergeModule

    return MergeModule(experts=[str(directory)], method=TaskArithmetic(), output_dir=None)


# ----------------------------------------------------------------------------- the converter's inputs
# (python -m safemerge.convert: every refusal is one line, and the output "converted" is never written)


def _converted(path: Path) -> Path:
    return path.parent / "converted"


def _hf_clip(**vision):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config={
            **dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            **vision,
        },
        projection_dim=16,
    )


_HF_BASE: list[Path] = []


def _hf_base() -> Path:
    """One converted base for the table's hf-expert rows (made once)."""
    if not _HF_BASE:
        import tempfile

        from transformers import CLIPModel

        from safemerge.convert.hf import convert_base

        tmp = Path(tempfile.mkdtemp(prefix="hostile-hf-base-"))
        CLIPModel(_hf_clip()).save_pretrained(tmp / "hf")
        _HF_BASE.append(convert_base(str(tmp / "hf"), tmp / "base"))
    return _HF_BASE[0]


def _hf_expert(**vision):
    def build(tmp: Path, clip_state) -> Path:
        from transformers import CLIPVisionModel

        CLIPVisionModel(_hf_clip(**vision).vision_config).save_pretrained(tmp / "hf_expert")
        return tmp / "hf_expert"

    return build


def _not_clip(tmp: Path, clip_state) -> Path:
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    save_tensors(tmp / "bert" / "model.safetensors", {"embeddings.word_embeddings.weight": torch.ones(4, 32)})
    return tmp / "bert"


def _task_vectors_head(rows: int):
    """A task_vectors ClassificationHead pickle (its class exists only while it is written)."""
    import sys
    import types

    def build(tmp: Path, clip_state) -> Path:
        class ClassificationHead(torch.nn.Linear):
            pass

        ClassificationHead.__module__, ClassificationHead.__qualname__ = "src.modeling", "ClassificationHead"
        sys.modules["src"], sys.modules["src.modeling"] = types.ModuleType("src"), types.ModuleType("src.modeling")
        module = sys.modules["src.modeling"]
        module.ClassificationHead = ClassificationHead
        try:
            head = ClassificationHead(clip_state["visual.proj"].shape[1], rows)
            head.normalize = True
            torch.nn.init.zeros_(head.bias)
            torch.save(head, tmp / "head_digits.pt")
        finally:
            del sys.modules["src.modeling"], sys.modules["src"]
        return tmp / "head_digits.pt"

    return build


def _finetuned(tmp: Path, clip_state) -> Path:
    """finetuned.pt as a plain state dict of ImageEncoder names (the tower only), and its base's weights."""
    save_tensors(tmp / "base.safetensors", clip_state)
    torch.save({f"model.{k}": v for k, v in clip_state.items() if k.startswith("visual.")}, tmp / "finetuned.pt")
    return tmp / "finetuned.pt"


def _truncated(save):
    def build(tmp: Path, clip_state) -> Path:
        path = _finetuned(tmp, clip_state)
        if save == "legacy":
            torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        return path

    return build


def _task_vectors(path: Path, head: Path | None = None, task: str = "digits"):
    from safemerge.convert.task_vectors import convert_task_vectors

    base = path.parent / "base.safetensors"  # the tiny CLIP's weights, written by the row's builder
    return convert_task_vectors(path, _converted(path), task, MODEL, str(base), head)


def _hf_expert_reader(path: Path, task: str = "mnist"):
    from safemerge.convert.hf import convert_expert

    return convert_expert(str(path), _converted(path), _hf_base(), task)


def _with_head(tmp_path_builder):
    def build(tmp: Path, clip_state) -> Path:
        _finetuned(tmp, clip_state)
        return tmp_path_builder(tmp, clip_state)

    return build


READERS = {
    "load_tensors": load_tensors,
    "read_expert": read_expert,
    "load_clip": lambda path: load_clip(MODEL, str(path)),
    "merge pool": _merge_pool,  # MergeModule's check of every expert against the base
    "convert hf-base": lambda path: __import__("safemerge.convert.hf").convert.hf.convert_base(
        str(path), _converted(path)
    ),
    "convert hf-expert": _hf_expert_reader,
    "convert hf-expert, unknown task": lambda path: _hf_expert_reader(path, task="no_such_task"),
    "convert task-vectors": _task_vectors,
    "convert task-vectors --head": lambda head: _task_vectors(head.parent / "finetuned.pt", head),
}

ROWS = {
    # --- safetensors that safetensors itself cannot read
    "truncated safetensors": (
        _file("w.safetensors", _safetensors_bytes(cut=60)),
        "load_tensors",
        CheckpointError,
        "truncated or corrupt",
    ),
    "oversized header": (
        _file("w.safetensors", _safetensors_bytes(length=2**40)),
        "load_tensors",
        CheckpointError,
        "header too large",
    ),
    "header longer than the file": (
        _file("w.safetensors", _safetensors_bytes(length=10**6)),
        "load_tensors",
        CheckpointError,
        "invalid header length",
    ),
    "cut tensor shape": (
        _file("w.safetensors", _safetensors_bytes(lambda h: h.update(shape=[200]))),
        "load_tensors",
        CheckpointError,
        "invalid shape, data type, or offset",
    ),
    "offsets past the data": (
        _file("w.safetensors", _safetensors_bytes(lambda h: h.update(shape=[200], data_offsets=[0, 800]))),
        "load_tensors",
        CheckpointError,
        "not fully covered",
    ),
    "unknown dtype in header": (
        _file("w.safetensors", _safetensors_bytes(lambda h: h.update(dtype="X99"))),
        "load_tensors",
        CheckpointError,
        "unknown variant `X99`",
    ),
    "pickle renamed to .safetensors": (
        _file("w.safetensors", _pickle_dump(lambda m: {"w": _RunsCode(m)})),
        "load_tensors",
        CheckpointError,
        "not a readable safetensors file",
    ),
    # --- pickles: never unpickled beyond tensors
    "pickle whose __reduce__ runs os.system (.pt)": (
        _file("w.pt", _pickle_dump(lambda m: {"w": _RunsCode(m)})),
        "load_tensors",
        UnsafeCheckpointError,
        "refusing to load .*w.pt.*could run code",
    ),
    "torch.save zip with a non-allowlisted global (.bin)": (
        _file("w.bin", _torch_save(lambda m: {"w": torch.ones(2), "x": _RunsCode(m)})),
        "load_tensors",
        UnsafeCheckpointError,
        "refusing to load .*w.bin.*(posix|os).system",
    ),
    "torch.save zip with a non-allowlisted global (.ckpt) as pretrained weights": (
        _file("w.ckpt", _torch_save(lambda m: {"state_dict": _RunsCode(m)})),
        "load_clip",
        UnsafeCheckpointError,
        "refusing to load .*w.ckpt",
    ),
    "tensor pickle holding no tensors": (
        _file("w.pt", _torch_save(lambda m: {"w": [1, 2, 3]})),
        "load_tensors",
        CheckpointError,
        "not a flat mapping of names to tensors",
    ),
    "garbage .pt": (
        _file("w.pt", b"PK\x03\x04 not really a zip"),
        "load_tensors",
        CheckpointError,
        "w.pt cannot be read",
    ),
    "unknown suffix": (
        _file("w.pkl", _pickle_dump(lambda m: {"w": torch.ones(2)})),
        "load_tensors",
        CheckpointError,
        "unknown suffix '.pkl'",
    ),
    # --- tensors that do not fit the architecture
    "NaN in an expert tensor": (
        lambda t, s: _expert(t, s, encoder=_edit("conv1.weight", _nan)),
        "merge pool",
        CheckpointError,
        "tensor 'conv1.weight' has 1 non-finite values",
    ),
    "inf in pretrained weights": (
        _pretrained(lambda s: s.update({"logit_scale": torch.tensor(float("inf"))})),
        "load_clip",
        CheckpointError,
        "tensor 'logit_scale' has 1 non-finite",
    ),
    "int tensor where float weights are expected": (
        lambda t, s: _expert(t, s, encoder=_edit("conv1.weight", lambda w: w.long())),
        "merge pool",
        CheckpointError,
        "tensor 'conv1.weight' has dtype torch.int64, the architecture's is torch.float32",
    ),
    "complex tensor where float weights are expected": (
        lambda t, s: _expert(t, s, encoder=_edit("proj", lambda w: w.to(torch.complex64))),
        "merge pool",
        CheckpointError,
        "tensor 'proj' has dtype torch.complex64",
    ),
    "expert tensor shape mismatched with the architecture": (
        lambda t, s: _expert(t, s, encoder=_edit("proj", lambda w: w[:-1])),
        "merge pool",
        CheckpointError,
        "tensor 'proj' has shape",
    ),
    "pretrained tensor shape mismatched with the architecture": (
        _pretrained(lambda s: s.update({"visual.proj": s["visual.proj"][:, :-1]})),
        "load_clip",
        CheckpointError,
        "tensor 'visual.proj' has shape",
    ),
    "expert tensor missing": (
        lambda t, s: _expert(t, s, encoder=lambda v: {k: x for k, x in v.items() if k != "proj"}),
        "merge pool",
        CheckpointError,
        "1 missing tensors \\(e.g. \\['proj'\\]\\)",
    ),
    "extra tensor in pretrained weights": (
        _pretrained(lambda s: s.update({"backdoor.extra": torch.ones(2)})),
        "load_clip",
        CheckpointError,
        "1 unexpected \\(e.g. \\['backdoor.extra'\\]\\)",
    ),
    # --- expert.json
    "encoder.safetensors missing": (
        lambda t, s: _removed(_expert(t, s), "encoder.safetensors"),
        "read_expert",
        CheckpointError,
        "is missing encoder.safetensors",
    ),
    "expert.json missing": (
        lambda t, s: _removed(_expert(t, s), "expert.json"),
        "read_expert",
        CheckpointError,
        "is missing expert.json",
    ),
    "expert.json not JSON": (
        lambda t, s: _expert(t, s, info="{not json"),
        "read_expert",
        CheckpointError,
        "expert.json is not valid JSON",
    ),
    "expert.json not an object": (
        lambda t, s: _expert(t, s, info="[1, 2]"),
        "read_expert",
        CheckpointError,
        "must hold a JSON object, got list",
    ),
    "expert.json wrong format": (
        lambda t, s: _expert(t, s, info=_info(lambda d: d.update(format="safemerge-expert/2"))),
        "read_expert",
        CheckpointError,
        "has format 'safemerge-expert/2'; expected 'safemerge-expert/1'",
    ),
    "expert.json missing field": (
        lambda t, s: _expert(t, s, info=_info(lambda d: d.pop("task"))),
        "read_expert",
        CheckpointError,
        "no valid 'task' field \\(expected str; it is missing\\)",
    ),
    "expert.json extra field": (
        lambda t, s: _expert(t, s, info=_info(lambda d: d.update(run_this="rm -rf"))),
        "read_expert",
        CheckpointError,
        "unknown fields \\['run_this'\\]",
    ),
    "expert.json num_classes a bool": (
        lambda t, s: _expert(t, s, info=_info(lambda d: d.update(num_classes=True))),
        "read_expert",
        CheckpointError,
        "no valid 'num_classes' field \\(expected int; got True\\)",
    ),
    "expert.json backdoor without target class": (
        lambda t, s: _expert(t, s, info=_info(lambda d: d.update(backdoor={"attack": "badnets"}))),
        "read_expert",
        CheckpointError,
        "no valid backdoor.'target_class' field",
    ),
    # --- the converter (python -m safemerge.convert)
    "directory that is not CLIP (hf-base)": (
        _not_clip,
        "convert hf-base",
        CheckpointError,
        "describes a 'bert' model, not CLIP",
    ),
    "HF expert of another width than the base": (
        _hf_expert(hidden_size=48, intermediate_size=96),
        "convert hf-expert",
        CheckpointError,
        "does not match the base .*width 48 \\(base 32\\)",
    ),
    "HF expert of another patch size than the base": (
        _hf_expert(patch_size=16),
        "convert hf-expert",
        CheckpointError,
        "does not match the base .*patch_size 16 \\(base 8\\)",
    ),
    "HF expert with more layers than the base": (
        _hf_expert(num_hidden_layers=3),
        "convert hf-expert",
        CheckpointError,
        "does not match the base .*layers 3 \\(base 2\\)",
    ),
    "HF expert for an unknown task": (
        _hf_expert(),
        "convert hf-expert, unknown task",
        UnknownTaskError,
        "--task for .*unknown task 'no_such_task'",
    ),
    "task_vectors head whose class count differs from the task's": (
        _with_head(_task_vectors_head(7)),
        "convert task-vectors --head",
        CheckpointError,
        "has 7 classes but task digits has 10",
    ),
    "truncated task_vectors checkpoint (zip)": (
        _truncated("zip"),
        "convert task-vectors",
        CheckpointError,
        "cannot be read .*truncated or corrupt",
    ),
    "truncated task_vectors checkpoint (legacy)": (
        _truncated("legacy"),
        "convert task-vectors",
        CheckpointError,
        "truncated",
    ),
    "task_vectors checkpoint whose reduce runs os.system (zip)": (
        _file("finetuned.pt", _torch_save(lambda m: {"model": _RunsCode(m)})),
        "convert task-vectors",
        UnsafeCheckpointError,
        "refusing to load .*finetuned.pt.*the global posix.system",
    ),
    "task_vectors checkpoint whose reduce runs os.system (raw pickle)": (
        _file("finetuned.pt", _pickle_dump(lambda m: [_RunsCode(m)])),
        "convert task-vectors",
        UnsafeCheckpointError,
        "refusing to load .*finetuned.pt.*the global posix.system",
    ),
    # --- allowed: symlinks (hub caches); what loads must be the original tensors
    "symlinked expert files (hub cache layout) load": (
        _symlinked_expert,
        "read_expert",
        None,
        lambda expert, state: _same(expert.encoder, _visual(state)),
    ),
    "symlinked pretrained weights load": (
        _symlinked_weights,
        "load_clip",
        None,
        lambda clip, state: _same(clip.model.state_dict(), state),
    ),
}


def _visual(state):
    return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}


def _same(loaded, original) -> None:
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("build, reader, error, message", ROWS.values(), ids=ROWS.keys())
def test_hostile_checkpoint_is_refused_with_a_one_line_error_and_runs_no_code(
    build, reader, error, message, tmp_path, clip_state
):
    target = build(tmp_path, clip_state)
    if error is None:
        message(READERS[reader](target), clip_state)  # here: the check of what was loaded
        return
    with pytest.raises(SafemergeError) as caught:
        READERS[reader](target)
    err = caught.value
    assert type(err) is error, f"{type(err).__name__}: {err}"
    text = str(err)
    assert __import__("re").search(message, text), text
    assert "\n" not in text, text
    assert str(target) in text, text  # names the file (or the expert directory) by its path
    assert not (tmp_path / MARKER).exists(), "a checkpoint ran code"
    assert not _converted(target).exists() and not list(target.parent.glob(".converted*")), "a refused conversion wrote"


def test_the_hostile_pickles_would_run_code_if_unpickled(tmp_path):
    """The table's pickles are real attacks: a plain unpickle creates the marker."""
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / MARKER)))
    assert (tmp_path / MARKER).exists()
