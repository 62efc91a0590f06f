"""Seeded generators: the same random draws on every process, from a seed and a key."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(seed: int, key: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by sha256(``"{seed}:{key}"``): reproducible and the same on every rank
    (a mask sample per step, an adaptation stream per task)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
