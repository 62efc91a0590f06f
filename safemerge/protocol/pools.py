"""Named pools: ``configs/pools/<name>.yaml`` (mini) and ``configs/paper/pools/<name>.yaml``,
read through one loader, and the backdoor / clean-twin pairing of mini experts.

A pool file is a partial merge config: ``model.init_args.experts``, a list of expert references
(a directory, or ``mini:<task>[:<variant>]`` for a cached mini expert).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from safemerge.errors import ConfigError
from safemerge.experts import MINI_PREFIX

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
POOLS = CONFIGS / "pools"
PAPER_POOLS = CONFIGS / "paper" / "pools"
DEFAULT_POOL = "mini_default"  # the one definition of the default pool: configs/pools/mini_default.yaml


def pool_file(name: str, folder: Path = POOLS) -> Path:
    """``<folder>/<name>.yaml``, or an error listing the pools there."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise ConfigError(f"unknown pool {name!r}; pools ({_shown(folder)}): {known}")
    return path


def experts_of(config: Path) -> list[str]:
    """The expert references of a pool file (or any merge config that names its experts)."""
    try:
        return list(yaml.safe_load(config.read_text())["model"]["init_args"]["experts"])
    except (KeyError, TypeError):
        raise ConfigError(f"{config} names no experts: a pool file sets model.init_args.experts") from None


def pool_experts(name: str, folder: Path = POOLS) -> list[str]:
    """The expert references of the pool ``name``."""
    return experts_of(pool_file(name, folder))


def clean_twin(reference: str) -> str:
    """``mini:<task>:<variant>`` → ``mini:<task>`` (a clean reference is its own twin)."""
    return ":".join(reference.split(":")[:2])


def backdoored_mini_pool(name: str, folder: Path = POOLS) -> list[str]:
    """The references of a mini pool with at least one backdoored expert: what has clean twins
    and triggers to measure."""
    references = pool_experts(name, folder)
    if not all(r.startswith(MINI_PREFIX) for r in references):
        raise ConfigError(f"pool {name!r} has experts outside the mini pool: no clean twin to build")
    if all(clean_twin(r) == r for r in references):
        raise ConfigError(f"pool {name!r} has no backdoored expert: there is no trigger to measure")
    return references


def _shown(folder: Path) -> str:
    try:
        return folder.relative_to(CONFIGS.parent).as_posix()
    except ValueError:
        return str(folder)
