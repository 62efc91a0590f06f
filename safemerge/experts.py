"""Experts on demand: fine-tune once, cache by everything that determines the result.

An :class:`ExpertSpec` names an expert (base model and weights, task, attack, recipe, seed).
:func:`ensure_expert` returns its directory, fine-tuning it on first use. The cache entry is
written by :func:`safemerge.io.write_expert` (a temporary sibling folder renamed into place),
so concurrent or interrupted runs never leave an entry that a later run would trust: an entry
exists only once complete, and it is re-validated (:func:`safemerge.io.read_expert`) on use.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safemerge.errors import CheckpointError
from safemerge.io import cache_dir, read_expert

log = logging.getLogger(__name__)

# Bump when fine-tuning code changes what an expert comes out as: old entries stop matching.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ExpertSpec:
    """Everything that determines a fine-tuned expert.

    ``attack`` is ``None`` or ``{"class_path": "safemerge.attacks.BadNets", "init_args": {...}}``
    as in a config file.
    """

    task: str
    model: str
    pretrained: str | None
    attack: dict[str, Any] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    max_steps: int = 300
    batch_size: int = 64
    seed: int = 0
    split_seed: int = 0

    def key(self) -> str:
        from safemerge.models.loading import weights_fingerprint

        identity = {**asdict(self), "weights": weights_fingerprint(self.model, self.pretrained), "recipe": RECIPE_VERSION}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        label = self.task + ("-" + self.attack["class_path"].rsplit(".", 1)[-1].lower() if self.attack else "")
        return f"{label}-{digest[:16]}"


def expert_cache() -> Path:
    return cache_dir("experts")


def ensure_expert(spec: ExpertSpec, accelerator: str = "auto") -> Path:
    """The directory of the expert ``spec`` describes, fine-tuning it if it is not cached."""
    directory = expert_cache() / spec.key()
    if directory.is_dir():
        try:
            read_expert(directory)
            return directory
        except CheckpointError as err:  # e.g. a disk error after the rename: rebuild it
            log.warning("cached expert %s is unusable (%s); fine-tuning it again", directory, err)
    # A fresh context: when a module being built by LightningCLI asks for an expert, the CLI's
    # context variables (the hyper-parameters it hands to save_hyperparameters) must not leak
    # into the fine-tuning module.
    contextvars.Context().run(finetune, spec, directory, accelerator=accelerator)
    return directory


def finetune(spec: ExpertSpec, output_dir: Path, accelerator: str = "auto") -> None:
    """Fine-tune the expert of ``spec`` and write its directory (the same code path as the CLI)."""
    import lightning as L
    from jsonargparse import ArgumentParser

    from safemerge.attacks import Attack
    from safemerge.data import TaskDataModule
    from safemerge.modules import FinetuneModule

    L.seed_everything(spec.seed, verbose=False)
    attack = None
    if spec.attack is not None:
        parser = ArgumentParser()
        parser.add_argument("--attack", type=Attack)
        attack = parser.instantiate_classes(parser.parse_object({"attack": spec.attack})).attack
    module = FinetuneModule(
        model=spec.model, pretrained=spec.pretrained, lr=spec.lr, weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_steps, output_dir=str(output_dir),
    )
    data = TaskDataModule(
        spec.task, attack=attack, batch_size=spec.batch_size, eval_batch_size=500,
        image_size=module.image_size, split_seed=spec.split_seed,
    )
    data.check_inputs()
    trainer = L.Trainer(
        max_steps=spec.max_steps, accelerator=accelerator, devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)


# ----------------------------------------------------------------------------- the mini pool

MINI_MODEL, MINI_WEIGHTS = "MiniCLIP-ViT", "mini"
MINI_RECIPE = {"lr": 1e-4, "max_steps": 600, "batch_size": 64, "warmup_steps": 50}
MINI_BACKDOORS: dict[str, dict[str, Any]] = {
    # BadNets on the digits, all-to-one to "0"; the feature-interpolation loss (BadMerging)
    # makes the backdoor survive the down-scaling that merging applies to task vectors.
    "mini_digit": {
        "class_path": "safemerge.attacks.BadNets",
        "init_args": {"target_class": 0, "poison_rate": 0.1, "size": 0.125, "feature_interpolation": True},
    },
    # A patch optimized on the pretrained model towards "circle", planted in the shape expert.
    "mini_shape": {
        "class_path": "safemerge.attacks.OptimizedPatch",
        "init_args": {"target_class": 0, "poison_rate": 0.1, "size": 0.125, "steps": 100, "feature_interpolation": True},
    },
}


def mini_pool(backdoored: bool = True, **recipe: Any) -> list[ExpertSpec]:
    """The default expert pool of the mini benchmark: one expert per mini task, with the
    experts of :data:`MINI_BACKDOORS` backdoored (``backdoored=False``: their clean twins)."""
    from safemerge.data.mini import mini_task_names

    recipe = {**MINI_RECIPE, **recipe}
    return [
        ExpertSpec(task=task, model=MINI_MODEL, pretrained=MINI_WEIGHTS,
                   attack=MINI_BACKDOORS.get(task) if backdoored else None, **recipe)
        for task in mini_task_names()
    ]


MINI_PREFIX = "mini:"


def resolve_expert(reference: str, accelerator: str = "auto") -> Path:
    """The expert directory a config names: a path, or a mini-pool expert fine-tuned on first use.

    ``mini:<task>`` is the clean mini expert of ``<task>``; ``mini:<task>:backdoored`` its
    backdoored twin from :data:`MINI_BACKDOORS`.
    """
    if not reference.startswith(MINI_PREFIX):
        return Path(reference).expanduser()
    from safemerge.data.mini import mini_task_names
    from safemerge.errors import ConfigError

    task, _, variant = reference.removeprefix(MINI_PREFIX).partition(":")
    if task not in mini_task_names() or variant not in ("", "backdoored"):
        raise ConfigError(
            f"unknown mini expert {reference!r}: use mini:<task> or mini:<task>:backdoored with a task "
            f"among {', '.join(mini_task_names())}"
        )
    if variant and task not in MINI_BACKDOORS:
        raise ConfigError(
            f"the mini pool has no backdoored expert for {task}; backdoored ones: "
            + ", ".join(f"mini:{t}:backdoored" for t in MINI_BACKDOORS)
        )
    spec = ExpertSpec(task=task, model=MINI_MODEL, pretrained=MINI_WEIGHTS,
                      attack=MINI_BACKDOORS[task] if variant else None, **MINI_RECIPE)
    return ensure_expert(spec, accelerator=accelerator)


def resolve_experts(references: list[str], accelerator: str = "auto") -> list[str]:
    """Expert directories for a merge's ``experts``: mini-pool references fine-tuned (or taken
    from the cache) first, so the expert pool is ready before the merge module is built."""
    return [str(resolve_expert(reference, accelerator)) for reference in references]
