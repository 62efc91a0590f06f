"""safemerge's command line: a LightningCLI with fit / validate / test / predict.

``python trainer.py fit --config configs/finetune.yaml``. Models and datamodules are chosen
in the config by ``class_path``; the datamodule's image size is linked from the model.
A user mistake (:class:`~safemerge.errors.SafemergeError`) is printed as one ``error:`` line
and exits with status 2; nothing is written before the inputs are checked. A learned merge
stopped by SIGTERM saves its state and exits with status 143; ``--ckpt_path last`` resumes it
(:mod:`safemerge.modules.resume`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from safemerge.data.merge import MergeDataModule
from safemerge.errors import SafemergeError
from safemerge.experts import resolve_experts
from safemerge.io import read_checkpoint
from safemerge.modules.merge import MergeModule
from safemerge.modules.resume import SIGTERM_EXIT_STATUS, resolve_ckpt_path


def _default_wandb_mode() -> None:
    """Offline W&B unless the user chose a mode or is logged in: never block on a login prompt."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


class SafemergeCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """The config is the command line's: a checkpoint is never unpickled into it (LightningCLI
        would read its hyper-parameters here, before any check). A merge's checkpoint is read
        safely and checked against the config in :meth:`_check_resume_checkpoint`."""

    def add_arguments_to_parser(self, parser) -> None:
        # The model decides the image size; the datamodule serves images of that size.
        parser.link_arguments("model.image_size", "data.init_args.image_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # A merge's expert pool is resolved before the merge module is built: mini-pool
        # references become directories (fine-tuned on first use) and paths have their `~` and
        # environment variables ($SAFEMERGE_EXPERTS) expanded, so the module only reads experts.
        config = self.config[self.subcommand] if self.subcommand else self.config
        init_args = getattr(config.get("model"), "init_args", None)
        experts = init_args.get("experts") if init_args is not None else None
        if isinstance(experts, list):
            init_args.experts = resolve_experts([str(e) for e in experts])
        # The merge's seed (mask samples, adaptation stream) is the run's seed_everything, passed
        # explicitly (LightningCLI has resolved it to a number by now).
        if init_args is not None and "seed" in init_args and isinstance(config.get("seed_everything"), int):
            init_args.seed = config.seed_everything

    def _check_inputs(self) -> None:
        # Loggers (W&B) start writing as soon as the trainer runs: read every input first.
        if isinstance(self.datamodule, MergeDataModule) and isinstance(self.model, MergeModule):
            self.datamodule.bind(self.model.data_plan())  # a merge's data serves its experts' tasks and backdoors
        check = getattr(self.datamodule, "check_inputs", None)
        if check is not None:
            check()
        if hasattr(self.model, "check_resumable"):
            self._check_resume_checkpoint()

    before_fit = before_validate = before_test = before_predict = _check_inputs

    def _check_resume_checkpoint(self) -> None:
        """A merge's ``--ckpt_path``: ``last`` is its output directory's resume checkpoint; the
        file is read safely and must belong to this merge. Lightning then loads it weights-only."""
        kwargs = self.config_init[self.subcommand]
        path = kwargs.get("ckpt_path")
        if not path:
            return
        path = resolve_ckpt_path(path, self.model.hparams.output_dir)
        self.model.check_resumable(read_checkpoint(path), f"checkpoint {path}")
        kwargs["ckpt_path"] = str(path)
        kwargs["weights_only"] = True

    def after_fit(self) -> None:
        # The final test metrics go into the expert (or report) the model writes.
        if self.trainer.interrupted:
            return
        if type(self.model).test_step is not L.LightningModule.test_step:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)


def _user_error(err: BaseException) -> SafemergeError | None:
    """The user mistake behind an exception: jsonargparse wraps errors raised while it
    instantiates classes, keeping the original as the cause."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SafemergeError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: list[str] | None = None) -> None:
    _default_wandb_mode()
    try:
        SafemergeCLI(args=args)
    except SIGTERMException:  # the merge saved its state and said how to resume
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
