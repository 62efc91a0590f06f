"""Resumable merges: the checkpoint a learned merge writes, when it writes it, and where.

A merge that learns (a learned method, a defence) writes ``<output_dir>/checkpoints/last.ckpt``
every ``checkpoint_every`` adaptation steps, at the end of training and when the process
receives SIGTERM (then it exits with status 143 and says how to resume); ``python trainer.py
fit ... --ckpt_path last`` continues from it. The checkpoint holds the trainable state only
(:meth:`MergeModule.on_save_checkpoint`): the learned tensors and the step count, the optimizer
states and Lightning's loop counters, and a ``safemerge`` record of the merge it belongs to —
tensors and plain types, read back with ``torch.load(weights_only=True)``. The frozen base and
task vectors are re-derived from the experts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from safemerge.io import atomic_path

RESUME_FORMAT = "safemerge-resume/1"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM: the shell's status of a terminated process


def last_checkpoint(output_dir: str | Path) -> Path:
    """Where a merge writing to ``output_dir`` keeps its resume checkpoint."""
    return Path(output_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


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
                file=sys.stderr, flush=True,
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
