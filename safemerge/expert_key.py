"""The cache key of an expert: what made it, digested.

:func:`code_digest` digests the code that fine-tunes (:data:`FINETUNE_CODE`), :func:`data_digest` a
task's data definition (its registry entry, the source its images are built by and the data files
that source lists). :meth:`safemerge.experts.ExpertSpec.key` combines them with the spec and the
base weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

# The code an expert is made of: an edit to any of these files gives every expert a new key. A
# package counts with all its .py and .json files. tests/test_expert_cache.py checks that every
# safemerge module these import is listed here or in NOT_IN_KEY.
FINETUNE_CODE: tuple[str, ...] = (
    "safemerge.experts",  # finetune(): the seed and the trainer
    "safemerge.expert_key",  # what the key digests (this list, the data definition)
    "safemerge.modules.finetune",  # the loss, the tuned blocks, feature interpolation, the export
    "safemerge.modules.schedule",  # the learning-rate schedule
    "safemerge.attacks",  # triggers, poisoning, trigger optimisation
    "safemerge.data.datamodule",  # batches, poisoned and triggered views
    "safemerge.data.transforms",  # resizing, the split carve
    "safemerge.data.registry",  # task look-up
    "safemerge.data.tasks",  # prompts of a task
    "safemerge.evaluation",  # classifier_for: the frozen zero-shot heads
    "safemerge.models",  # loading, the classifier, the heads, the JSON architectures
    "safemerge.metrics",  # the test accuracy and ASR written to expert.json
)
# Imported by the code above but unable to change an expert: error messages, file I/O (whose
# format read_expert checks on every use) and report tables.
# Reached (safemerge.data imports the merge datamodule) but never run by fine-tuning: the merge's
# adaptation stream and its seeded generator; messages, file writing and reports.
NOT_IN_KEY: tuple[str, ...] = (
    "safemerge.data.merge",
    "safemerge.seeding",
    "safemerge.errors",
    "safemerge.io",
    "safemerge.report",
)
_CODE_SUFFIXES = (".py", ".json")


def code_digest() -> str:
    """A digest of the contents of the files of :data:`FINETUNE_CODE`."""
    digest = hashlib.sha256()
    for name in FINETUNE_CODE:
        for label, path in _module_files(name):
            digest.update(f"{label}\0".encode() + _read(path) + b"\0")
    return digest.hexdigest()


def data_digest(task_name: str) -> str:
    """A digest of a task's data definition: its registry entry (class names, prompts, builder),
    the source of the module that builds its images and of the project modules that one draws
    on (followed through its globals, so helpers and constants in other files count), and the
    contents of the files that module lists in ``DATA_FILES`` (its image and font assets). A
    real dataset's files under the user's root are not read: they are the dataset itself."""
    from safemerge.data.registry import get_task

    task = get_task(task_name)
    build, arguments = task.build, []
    while isinstance(build, functools.partial):  # the built-in tasks bind their name to a shared builder
        arguments = [*map(repr, build.args), *(f"{k}={v!r}" for k, v in sorted(build.keywords.items())), *arguments]
        build = build.func
    if not hasattr(build, "__qualname__"):  # a callable object (the real datasets' builders)
        build = type(build)
    module = inspect.getmodule(build)
    entry = {
        "name": task.name,
        "classnames": list(task.classnames),
        "prompts": [template("{}") for template in task.templates],
        "needs_root": task.needs_root,
        "builder": f"{module.__name__}.{build.__qualname__}",
        "arguments": arguments,
    }
    digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode())
    for source in _drawn_on(module):
        digest.update(f"{source.__name__}\0".encode() + _read(Path(source.__file__)) + b"\0")
    for path in getattr(module, "DATA_FILES", ()):
        digest.update(f"{Path(path).name}\0{_file_digest(Path(path))}\0".encode())
    return digest.hexdigest()


def _drawn_on(module: types.ModuleType) -> list[types.ModuleType]:
    """``module`` and the modules of its own package or of safemerge that its globals reach,
    transitively, less :data:`NOT_IN_KEY` (third-party code is not followed). Each counts with its
    own file only: a package reached through ``import safemerge.x`` is its ``__init__.py``."""
    roots = {"safemerge", module.__name__.partition(".")[0]}
    seen: set[str] = set()
    found: dict[str, types.ModuleType] = {}
    pending = [module]
    while pending:
        current = pending.pop()
        if current.__name__ in seen or current.__name__ in NOT_IN_KEY:
            continue
        seen.add(current.__name__)
        if getattr(current, "__file__", None):  # a namespace package has no source of its own
            found[current.__name__] = current
        for value in vars(current).values():
            owner = (
                value if isinstance(value, types.ModuleType) else sys.modules.get(str(getattr(value, "__module__", "")))
            )
            if isinstance(owner, types.ModuleType) and owner.__name__.partition(".")[0] in roots:
                pending.append(owner)
    return [found[name] for name in sorted(found)]


def _module_files(name: str) -> list[tuple[str, Path]]:
    """The files of module ``name`` as ``(stable label, path)``: a package's .py and .json files."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name} (listed in safemerge.expert_key) is not an importable module with a file")
    if not spec.submodule_search_locations:
        return [(name, Path(spec.origin))]
    folder = Path(spec.origin).parent
    files = sorted(p for p in folder.rglob("*") if p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts)
    return [(f"{name}/{p.relative_to(folder).as_posix()}", p) for p in files]


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _file_digest(path: Path) -> str:
    """The SHA-256 of a data file's contents (read in chunks: assets may be tens of MB)."""
    if not path.is_file():
        return "missing"  # building the task will say what to install; the key must still differ
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
