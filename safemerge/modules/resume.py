"""Resumable merges, in one place: the checkpoint a learned merge writes, when and where, what
it records, how ``--ckpt_path`` finds it, and the checks before it is loaded.

A merge that learns (a learned method, a defence) writes ``<output_dir>/checkpoints/last.ckpt``
every ``checkpoint_every`` adaptation steps, at the end of training and when the process
receives SIGTERM (then it exits with status 143 and says how to resume); ``python trainer.py
fit ... --ckpt_path last`` continues from it. The checkpoint holds the trainable state only
(:meth:`MergeModule.on_save_checkpoint`): the learned tensors and the step count, the optimizer
states and Lightning's loop counters, and a ``safemerge`` record of the merge it belongs to —
tensors and plain types, read back with ``torch.load(weights_only=True)``. The frozen base and
task vectors are re-derived from the experts. The record is read off the declarations: the
method's and defence's ``describe()``, the optimizers their stages declare, the learner's notes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from safemerge.errors import CheckpointError
from safemerge.io import atomic_path

# /2: optimizers in the stages' declared order, the steps' notes (was: "attribution") in the record
RESUME_FORMAT = "safemerge-resume/2"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM: the shell's status of a terminated process


def last_checkpoint(output_dir: str | Path) -> Path:
    """Where a merge writing to ``output_dir`` keeps its resume checkpoint."""
    return Path(output_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def resolve_ckpt_path(path: str, output_dir: str | None) -> Path:
    """``--ckpt_path``: ``last`` is the output directory's resume checkpoint (which must exist)."""
    if path != "last":
        return Path(path)
    if not output_dir:
        raise CheckpointError("--ckpt_path last: this merge has no output_dir, so it writes no checkpoint to resume")
    last = last_checkpoint(output_dir)
    if not last.is_file():
        raise CheckpointError(
            f"--ckpt_path last: there is no checkpoint to resume in {last.parent} (a learned merge writes "
            f"{last.name} there while it runs); run without --ckpt_path to start the merge"
        )
    return last


def resume_record(merge) -> dict[str, Any]:
    """What a merge's resume checkpoint belongs to (plain types), checked before it is loaded."""
    learner = merge.learner
    return {
        "format": RESUME_FORMAT,
        "experts": merge.expert_names,
        "tasks": merge.task_names,
        "model": merge.clip.name,
        "pretrained": merge.clip.pretrained,
        "seed": merge.seed,
        "method": merge.method.describe(),
        "defense": merge.defense.describe() if merge.defense else None,
        "optimizers": learner.optimizer_names(),
        "adaptation_steps": merge.adaptation_steps,
        "completed_steps": merge.completed_steps,
        "notes": learner.notes,
    }


def keep_trainable_state(merge, checkpoint: dict) -> None:
    """Only the trainable state goes in the checkpoint: the frozen base, task vectors and heads are
    re-derived from the experts. Lightning's hyper-parameter entries go (the record says what matters)."""
    checkpoint["state_dict"] = {k: v.cpu() for k, v in merge.learner.learned_state().items()}
    for key in ("hyper_parameters", "hparams_name", "datamodule_hyper_parameters", "datamodule_hparams_name"):
        checkpoint.pop(key, None)
    checkpoint["safemerge"] = resume_record(merge)


FRESH = "or start afresh without --ckpt_path (in another output_dir to keep the old one)"


def check_resumable(merge, checkpoint: dict, source: str) -> None:
    """A one-line :class:`CheckpointError` unless ``checkpoint`` is a resume checkpoint of this very
    merge: the same pool, method, defence and seed, the same learned tensors and optimizers."""
    record = checkpoint.get("safemerge")
    if not isinstance(record, dict) or record.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{source} is not a safemerge merge checkpoint (no {RESUME_FORMAT!r} record): resume only from "
            f"the {last_checkpoint('<output_dir>')} a merge writes"
        )
    if merge.learner is None:
        raise CheckpointError(
            f"{source} belongs to a learned merge ({record['method'].get('name')}), but this merge "
            f"({merge.method.name}, no defence) learns nothing and has nothing to resume: drop --ckpt_path"
        )
    ours = resume_record(merge)
    _check_same_merge(record, ours, source)
    _check_learned_tensors(checkpoint.get("state_dict"), merge.learner.learned_state(), source)
    optimizers = checkpoint.get("optimizer_states")
    if (
        record.get("optimizers") != ours["optimizers"]
        or not isinstance(optimizers, list)
        or len(optimizers) != len(ours["optimizers"])
    ):
        raise CheckpointError(
            f"{source} holds the optimizers {record.get('optimizers')}, this merge has {ours['optimizers']}; {FRESH}"
        )
    done = int(checkpoint["state_dict"]["completed_steps"])
    if not 0 <= done <= merge.adaptation_steps:
        raise CheckpointError(f"{source} is at step {done} of a {merge.adaptation_steps}-step schedule")


def _check_same_merge(record: dict, ours: dict, source: str) -> None:
    for key, what in (
        ("experts", "pool"),
        ("tasks", "tasks"),
        ("model", "base model"),
        ("pretrained", "pretrained weights"),
        ("seed", "seed"),
    ):
        if record.get(key) != ours[key]:
            raise CheckpointError(
                f"{source} was written by a merge with another {what}: {record.get(key)!r}, this run has "
                f"{ours[key]!r}; resume with the same {what}, {FRESH}"
            )
    for key in ("method", "defense"):
        if record.get(key) != ours[key]:
            raise CheckpointError(
                f"{source} was written by a merge with another {key}: {_difference(record.get(key), ours[key])}; "
                f"resume with the {key} it was written with, {FRESH}"
            )


def _check_learned_tensors(state: Any, expected: dict[str, Tensor], source: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} has no learned tensors (state_dict)")
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not hold this merge's learned tensors: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); resume a checkpoint of this merge, {FRESH}"
        )
    for name, tensor in expected.items():
        theirs = state[name]
        if not isinstance(theirs, Tensor) or theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            found = f"{tuple(theirs.shape)} {theirs.dtype}" if isinstance(theirs, Tensor) else type(theirs).__name__
            raise CheckpointError(
                f"{source}: learned tensor {name!r} is {found}, this merge's is {tuple(tensor.shape)} {tensor.dtype}; "
                f"resume a checkpoint of this merge, {FRESH}"
            )


def _difference(theirs: dict | None, ours: dict | None) -> str:
    """``name`` or the parameters in which two ``describe()`` records differ, in words."""
    if theirs is None or ours is None or theirs.get("name") != ours.get("name"):
        name = lambda d: d.get("name") if d else None  # noqa: E731
        return f"{name(theirs)} in the checkpoint, {name(ours)} in this run"
    params = lambda d: d.get("params", d)  # noqa: E731  (a defence's parameters are nested)
    keys = sorted(params(theirs).keys() | params(ours).keys())
    return ", ".join(
        f"{k} {params(theirs).get(k)!r} in the checkpoint, {params(ours).get(k)!r} in this run"
        for k in keys
        if params(theirs).get(k) != params(ours).get(k)
    )


class ResumeCheckpoint(L.Callback):
    """Write the merge's resume checkpoint every ``every_n_steps`` adaptation steps (None: never
    periodically), at the end of training, and on SIGTERM. Every write is atomic."""

    def __init__(self, path: Path, every_n_steps: int | None) -> None:
        self.path, self.every_n_steps = Path(path), every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = batch_idx + 1
        if self.every_n_steps and done % self.every_n_steps == 0 and done < pl_module.adaptation_steps:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer)  # a SIGTERM during the final test resumes from the finished training

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn == TrainerFn.FITTING:
            self.save(trainer)
        if trainer.is_global_zero:
            print(
                f"safemerge: received SIGTERM after {pl_module.completed_steps} of {pl_module.adaptation_steps} "
                f"adaptation steps; the merge's state is saved in {self.path}. Resume it with the same command "
                "and --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )

    def save(self, trainer) -> None:
        # Every rank takes part (the checkpoint is dumped everywhere, a barrier follows); only
        # rank 0 writes, to a temporary file renamed into place. This only writes: Lightning's
        # ``weights_only=False`` here means "with the optimizer states and loop counters", which
        # resuming needs (MergeModule.on_save_checkpoint keeps them to tensors and plain types).
        # Reading never unpickles objects: io.read_checkpoint and the CLI's resume load with
        # torch.load(weights_only=True).
        if not trainer.is_global_zero:
            trainer.save_checkpoint(self.path, weights_only=False)  # writes nothing off rank 0
            return
        with atomic_path(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)
