"""Safe reading and atomic writing of checkpoints, expert directories and JSON files.

Checkpoints are untrusted input (experts come from strangers): reading one never executes
code. ``.safetensors`` files are read with safetensors; ``.pt``/``.pth``/``.bin`` files only
through ``torch.load(weights_only=True)``, and a pickle that would need arbitrary objects is
refused with :class:`UnsafeCheckpointError`. Every write goes to a temporary file (or folder)
beside the target and is renamed into place, so an interrupted run never leaves a
half-written file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from safemerge.errors import CheckpointError, UnsafeCheckpointError

StateDict = dict[str, torch.Tensor]

EXPERT_FORMAT = "safemerge-expert/1"
ENCODER_FILE = "encoder.safetensors"
EXPERT_FILE = "expert.json"
TRIGGER_FILE = "trigger.safetensors"
HEAD_FILE = "head.safetensors"  # optional: the task's own classification head (e.g. a converted task_vectors head)


# ----------------------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; keep the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only once the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors as safetensors, atomically (contiguous CPU copies, shared storage split)."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


# ----------------------------------------------------------------------------- safe reads


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def load_tensors(path: str | os.PathLike) -> StateDict:
    """Read a flat ``name -> tensor`` checkpoint without executing code.

    Accepts safetensors, and pickled ``.pt``/``.pth``/``.bin``/``.ckpt`` files that hold only
    tensors and plain containers (a ``{"state_dict": ...}`` wrapper and a ``module.`` prefix
    from DDP are unwrapped). Every refusal is one line naming the file. Symlinks are followed
    (hub caches are built from them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {path} has an unknown suffix {path.suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file ({_first_line(err)}); "
                "it may be truncated or corrupt: re-create or re-download it"
            ) from None
    data = _torch_load(
        path, "convert it on a trusted machine to safetensors (safetensors.torch.save_file(model.state_dict(), ...))"
    )
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"checkpoint {path} is not a flat mapping of names to tensors")
    if data and all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return dict(data)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pickled checkpoint that holds only tensors and plain containers (dict, list,
    str, numbers), such as a merge's resume checkpoint, without executing code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = _torch_load(path, "re-create it with safemerge, whose checkpoints hold only tensors and plain types")
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}, not a dictionary")
    return data


def _torch_load(path: Path, remedy: str) -> Any:
    """``torch.load(weights_only=True)``: a pickle that needs arbitrary objects is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is a pickle that needs arbitrary Python objects to "
            f"load, which could run code. Only tensors and plain types are accepted; {remedy}. "
            f"Detail: {_unpickling_detail(err)}"
        ) from None
    except Exception as err:  # torch's zip and legacy readers raise many kinds on damaged input
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {_first_line(err)})") from None


def check_weights(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights that do not fit an architecture (``reference``, e.g. the base's state dict):
    missing or unexpected tensors, another shape, a dtype that is not the reference's kind
    (real floating point where the reference is floating point, e.g. no int or complex weights),
    non-finite values. ``source`` names the weights in the one-line error."""
    missing, unexpected = sorted(reference.keys() - state.keys()), sorted(state.keys() - reference.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the architecture: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for name, tensor in state.items():
        expected = reference[name]
        if tensor.shape != expected.shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the architecture's is {tuple(expected.shape)}"
            )
        if tensor.is_floating_point() != expected.is_floating_point() or tensor.is_complex():
            raise CheckpointError(
                f"{source}: tensor {name!r} has dtype {tensor.dtype}, the architecture's is {expected.dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} has {bad} non-finite values (NaN or inf)")


def _unpickling_detail(err: BaseException) -> str:
    """The line of torch's weights-only error that names what the pickle asked for."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (named or lines or [type(err).__name__])[0][:300]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(err)})") from None


# ----------------------------------------------------------------------------- expert directory


@dataclass
class Expert:
    """An expert directory in memory: the image tower's weights, its description, a trigger,
    and optionally the task's own head (``[num_classes, embed_dim]``, logit scale included, as
    :func:`safemerge.models.heads.zero_shot_head` makes them), used instead of the zero-shot one."""

    encoder: StateDict
    info: dict[str, Any]
    trigger: StateDict | None = None
    head: torch.Tensor | None = None

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def backdoor(self) -> dict[str, Any] | None:
        return self.info.get("backdoor")


# The fields of expert.json: name -> (accepted types, required). A field not listed is refused:
# a typo or another tool's file must not be half-read.
_NONE = type(None)
_INFO_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "model": ((str,), True),
    "pretrained": ((str, _NONE), True),
    "task": ((str,), True),
    "num_classes": ((int,), True),
    "backdoor": ((dict, _NONE), True),
    "metrics": ((dict,), True),
    "image_size": ((int,), False),
    "tasks": ((list,), False),
    "method": ((str,), False),
    "defense": ((str, _NONE), False),
}
_BACKDOOR_FIELDS = {"attack": (str,), "target_class": (int,), "target_task": (str, _NONE)}


def expert_info(
    *,
    model: str,
    pretrained: str | None,
    task: str,
    num_classes: int,
    backdoor: dict | None,
    metrics: dict,
    **extra: Any,
) -> dict[str, Any]:
    """The ``expert.json`` document of the contract."""
    return {
        "format": EXPERT_FORMAT,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "num_classes": num_classes,
        "backdoor": backdoor,
        "metrics": metrics,
        **extra,
    }


def write_expert(directory: str | os.PathLike, expert: Expert) -> Path:
    """Write an expert directory atomically: build it in a temporary sibling, then rename.

    An existing directory at the target is replaced only once the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        save_tensors(tmp / ENCODER_FILE, expert.encoder)
        if expert.trigger is not None:
            save_tensors(tmp / TRIGGER_FILE, expert.trigger)
        if expert.head is not None:
            save_tensors(tmp / HEAD_FILE, {"head": expert.head})
        write_json(tmp / EXPERT_FILE, expert.info)  # last: its presence marks a complete write
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:  # put the old expert back: a failed replace must not lose it
                os.replace(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_expert(directory: str | os.PathLike) -> Expert:
    """Read and validate an expert directory; every problem names the directory and the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"expert directory {directory} does not exist")
    for name in (EXPERT_FILE, ENCODER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"expert directory {directory} is missing {name}; an expert directory holds "
                f"{ENCODER_FILE}, {EXPERT_FILE} and, for an optimized trigger, {TRIGGER_FILE}"
            )
    info = read_json(directory / EXPERT_FILE)
    _check_info(info, directory / EXPERT_FILE)
    encoder = load_tensors(directory / ENCODER_FILE)
    trigger_path = directory / TRIGGER_FILE
    trigger = load_tensors(trigger_path) if trigger_path.is_file() else None
    head = _read_head(directory / HEAD_FILE, info["num_classes"]) if (directory / HEAD_FILE).is_file() else None
    return Expert(encoder=encoder, info=info, trigger=trigger, head=head)


def _read_head(path: Path, num_classes: int) -> torch.Tensor:
    tensors = load_tensors(path)
    head = tensors.get("head")
    if set(tensors) != {"head"} or head.ndim != 2 or not head.is_floating_point():
        raise CheckpointError(f"{path} must hold one float tensor 'head' of shape [num_classes, embed_dim]")
    if head.shape[0] != num_classes:
        raise CheckpointError(f"{path} has {head.shape[0]} rows but the expert has num_classes {num_classes}")
    if not bool(torch.isfinite(head).all()):
        raise CheckpointError(f"{path} has non-finite values (NaN or inf)")
    return head


def _check_info(info: Any, path: Path) -> None:
    """expert.json against the contract: the format, every field known, present and well typed."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(info).__name__}")
    if info.get("format") != EXPERT_FORMAT:
        raise CheckpointError(f"{path} has format {info.get('format')!r}; expected {EXPERT_FORMAT!r}")
    unknown = sorted(info.keys() - _INFO_FIELDS.keys())
    if unknown:
        raise CheckpointError(f"{path} has unknown fields {unknown}; known: {', '.join(_INFO_FIELDS)}")
    for key, (kinds, required) in _INFO_FIELDS.items():
        if key in info or required:
            _check_field(info, key, kinds, path)
    if info["num_classes"] < 1:
        raise CheckpointError(f"{path}: num_classes must be >= 1, got {info['num_classes']}")
    if info["backdoor"] is not None:
        for key, kinds in _BACKDOOR_FIELDS.items():
            if key in info["backdoor"] or key != "target_task":
                _check_field(info["backdoor"], key, kinds, path, "backdoor.")


def _check_field(document: dict, key: str, kinds: tuple[type, ...], path: Path, prefix: str = "") -> None:
    value = document.get(key, ...)
    # bool is an int to Python, not to the contract
    if value is ... or not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is _NONE else k.__name__ for k in kinds)
        found = "it is missing" if value is ... else f"got {value!r}"[:80]
        raise CheckpointError(f"{path} has no valid {prefix}{key!r} field (expected {names}; {found})")


def cache_dir(*parts: str) -> Path:
    """safemerge's cache folder (``$SAFEMERGE_CACHE``, else ``~/.cache/safemerge``)."""
    root = Path(os.environ.get("SAFEMERGE_CACHE") or Path.home() / ".cache" / "safemerge")
    return root.joinpath(*parts)
