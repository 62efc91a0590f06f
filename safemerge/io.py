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


def load_tensors(path: str | os.PathLike) -> StateDict:
    """Read a flat ``name -> tensor`` checkpoint without executing code.

    Accepts safetensors, and pickled ``.pt``/``.pth``/``.bin``/``.ckpt`` files that hold only
    tensors and plain containers (a ``{"state_dict": ...}`` wrapper and a ``module.`` prefix
    from DDP are unwrapped).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"checkpoint {path} is not a readable safetensors file ({err}); "
                "it may be truncated or corrupt: re-create or re-download it"
            ) from err
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is a pickle that needs arbitrary Python objects to "
            "load, which could run code. Only tensors are accepted; convert it on a trusted "
            "machine to safetensors (safetensors.torch.save_file(model.state_dict(), ...))."
            f"\n  detail: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err})") from err
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"checkpoint {path} is not a flat mapping of names to tensors")
    if data and all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return dict(data)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


# ----------------------------------------------------------------------------- expert directory


@dataclass
class Expert:
    """An expert directory in memory: the image tower's weights, its description, a trigger."""

    encoder: StateDict
    info: dict[str, Any]
    trigger: StateDict | None = None

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def backdoor(self) -> dict[str, Any] | None:
        return self.info.get("backdoor")


_REQUIRED_INFO = {"format": str, "model": str, "task": str, "num_classes": int, "metrics": dict}


def expert_info(
    *, model: str, pretrained: str | None, task: str, num_classes: int,
    backdoor: dict | None, metrics: dict, **extra: Any,
) -> dict[str, Any]:
    """The ``expert.json`` document of the contract."""
    return {
        "format": EXPERT_FORMAT, "model": model, "pretrained": pretrained, "task": task,
        "num_classes": num_classes, "backdoor": backdoor, "metrics": metrics, **extra,
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
        write_json(tmp / EXPERT_FILE, expert.info)  # last: its presence marks a complete write
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
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
    if not isinstance(info, dict):
        raise CheckpointError(f"{directory / EXPERT_FILE} must hold a JSON object")
    for key, kind in _REQUIRED_INFO.items():
        if not isinstance(info.get(key), kind):
            raise CheckpointError(
                f"{directory / EXPERT_FILE} has no valid {key!r} field "
                f"(expected {kind.__name__}, got {info.get(key)!r})"
            )
    if info["format"] != EXPERT_FORMAT:
        raise CheckpointError(
            f"{directory / EXPERT_FILE} has format {info['format']!r}; expected {EXPERT_FORMAT!r}"
        )
    encoder = load_tensors(directory / ENCODER_FILE)
    trigger_path = directory / TRIGGER_FILE
    trigger = load_tensors(trigger_path) if trigger_path.is_file() else None
    return Expert(encoder=encoder, info=info, trigger=trigger)


def cache_dir(*parts: str) -> Path:
    """safemerge's cache folder (``$SAFEMERGE_CACHE``, else ``~/.cache/safemerge``)."""
    root = Path(os.environ.get("SAFEMERGE_CACHE") or Path.home() / ".cache" / "safemerge")
    return root.joinpath(*parts)
