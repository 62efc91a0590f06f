"""safemerge's command line: a LightningCLI with fit / validate / test / predict.

``python trainer.py fit --config configs/finetune.yaml``. Models and datamodules are chosen
in the config by ``class_path``; the datamodule's image size is linked from the model.
A user mistake (:class:`~safemerge.errors.SafemergeError`, or a config that fails validation)
is printed as one ``error:`` line and exits with status 2; nothing is written before the inputs
are checked. A merge says what it does: one line per expert, one per stage, where the report
is; third-party tips and warnings known to be harmless are silenced here, at the entry point. A learned merge
stopped by SIGTERM saves its state and exits with status 143; ``--ckpt_path last`` resumes it
(:mod:`safemerge.modules.resume`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from safemerge.data.datamodule import build_split
from safemerge.data.merge import MergeDataModule
from safemerge.data.registry import SPLITS, get_task
from safemerge.errors import ConfigError, SafemergeError
from safemerge.experts import MINI_PREFIX, mini_backdoor, resolve_experts
from safemerge.io import read_checkpoint
from safemerge.modules.merge import MergeModule
from safemerge.modules.resume import SIGTERM_EXIT_STATUS, resolve_ckpt_path
from safemerge.report import run_title

_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_HARMLESS_WARNINGS = (
    r".*does not have many workers",
    r"Found \d+ module\(s\) in eval mode",
    r".*is deprecated",
    r"Your `IterableDataset` has `__len__` defined",  # the merge's stream: one loader process
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # short merges log at the end
)
_HARMLESS_WANDB = ("The anonymous setting has no effect", "git root ")


def say(message: str) -> None:
    """One line of the run's own account of what it does."""
    print(message, file=sys.stdout, flush=True)


def _silence_harmless_noise() -> None:
    """Third-party tips and warnings that say nothing about this run (never errors)."""
    for category in (DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in _RANK_ZERO_LOGGERS:  # Lightning's advertisements for its cloud products
        logging.getLogger(name).addFilter(lambda record: not record.getMessage().startswith("💡 Tip"))
    import wandb

    if not getattr(wandb.termwarn, "safemerge_filtered", False):
        termwarn = wandb.termwarn

        def filtered(string: str, *args, **kwargs):
            if not str(string).startswith(_HARMLESS_WANDB):
                termwarn(string, *args, **kwargs)

        filtered.safemerge_filtered = True
        wandb.termwarn = filtered


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's per-trainer banners (GPU available, ...) while experts are fine-tuned."""
    loggers = [logging.getLogger(name) for name in _RANK_ZERO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _pool_tasks(references: list[str]) -> list[str]:
    """The tasks whose data the mini-pool experts need: their own and their attacks' targets."""
    from safemerge.data.mini_v2 import domain_task_names

    tasks: dict[str, None] = {}
    for reference in references:
        if not reference.startswith(MINI_PREFIX):
            continue  # a given directory: nothing to fine-tune; the merge checks its data
        task, _, variant = reference.removeprefix(MINI_PREFIX).partition(":")
        if task not in domain_task_names():
            continue  # resolve_experts says what is wrong with the reference
        tasks[task] = None
        target = mini_backdoor(task, variant)["init_args"].get("target_task") if variant else None
        if target:
            tasks[target] = None
    return list(tasks)


def check_pool_data(references: list[str]) -> None:
    """Build every split of every task the pool's experts need (sources checked, nothing drawn),
    so missing data fails before the first expert is fine-tuned."""
    for task in _pool_tasks(references):
        for split in SPLITS:  # the mini pool's experts use split_seed 0; the sources do not depend on the size
            build_split(get_task(task), split, root=None, image_size=32, download=False, seed=0)


def resolve_pool(references: list[str]) -> list[str]:
    """The pool's expert directories, fine-tuned or taken from the cache (each says so in one
    line: :func:`safemerge.experts.ensure_expert`), after every task's data is checked."""
    check_pool_data(references)
    with _quiet_lightning():
        return resolve_experts(references)


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (a test's capture, a redirect);
    stderr is kept for the one ``error:`` line of a mistake."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _log_to_stdout() -> None:
    """safemerge's own INFO lines (an expert fine-tuned or cached, waiting for a lock) are the
    run's account of itself: print them bare on stdout; third-party INFO stays quiet."""
    logger = logging.getLogger("safemerge")
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # (the root logger has no handler in a run: nothing prints twice)


class MergeProgress(L.Callback):
    """A merge's stages as they start: merging, the defence, evaluation."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self._starts = {}
        learner = getattr(pl_module, "learner", None)
        if learner is None:
            say(f"merging: {_title(pl_module)} (nothing to learn)")
            return
        start = 0
        for stage, owner in learner.schedule:
            role = "defence" if owner is pl_module.defense else "merging"
            self._starts[start] = f"{role}: {type(owner).__name__} {stage.name}, {stage.steps} steps"
            start += stage.steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx in self._starts:
            say(self._starts[batch_idx])

    def on_test_start(self, trainer, pl_module) -> None:
        say(f"evaluating: {_title(pl_module)} on the test splits of {len(pl_module.task_names)} tasks")


def _title(module) -> str:
    method = module.method.describe()
    return run_title(
        {
            "method": method["name"],
            "config": {"method": method},
            "defense": module.defense.describe() if module.defense else None,
        }
    )


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
            init_args.experts = resolve_pool([str(e) for e in experts])
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

    before_validate = before_test = before_predict = _check_inputs

    def before_fit(self) -> None:
        self._check_inputs()
        steps = getattr(self.model, "adaptation_steps", None)
        interval = self.trainer.val_check_interval
        if steps and isinstance(interval, int) and interval > steps:
            # A learned merge shorter than the validation interval validates once, at its end
            # (Lightning refuses an interval longer than the training).
            self.trainer.val_check_interval = steps
        if hasattr(self.model, "learner"):
            self.trainer.callbacks.append(MergeProgress())

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
            output_dir = getattr(self.model, "hparams", {}).get("output_dir")
            if hasattr(self.model, "learner") and output_dir and self.trainer.is_global_zero:
                say(f"report written to {Path(output_dir) / 'report.md'} (and report.json, merged/)")


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


# jsonargparse's account of which union alternatives it tried: not what the user must change.
_UNION_NOISE = (
    "Given value",
    "Subtypes:",
    "Errors:",
    "- Expected a <class 'NoneType'>",
    "Does not validate against any",
)


def _config_error(err: argparse.ArgumentError, args: list[str]) -> ConfigError:
    """A config that fails validation, in one line, with what to add when a file lacks its base."""
    message = str(err)
    if re.search(r"class_path 'lightning\.(pytorch\.)?(LightningModule|LightningDataModule)'", message):
        return ConfigError(
            "the configuration names no model or data class (model.class_path, data.class_path): a method, "
            "defence, DAM-option or pool file only adds to a base: add --config configs/merge/base.yaml first "
            "(e.g. python trainer.py fit --config configs/merge/base.yaml --config configs/merge/task_arithmetic.yaml)"
        )
    keep = [
        line.strip().removeprefix("- ")
        for line in message.splitlines()
        if line.strip() and not line.strip().startswith(_UNION_NOISE)
    ]
    prog = "python trainer.py " + (args[0] if args and not args[0].startswith("-") else "fit")
    return ConfigError(f"invalid configuration: {' '.join(keep)} (options: {prog} --help)")


def main(args: list[str] | None = None) -> None:
    _default_wandb_mode()
    _silence_harmless_noise()
    _log_to_stdout()
    # Validation errors come back as exceptions (one line below), not as usage and a union error.
    strict = {
        "exit_on_error": False,
        **{command: {"exit_on_error": False} for command in ("fit", "validate", "test", "predict")},
    }
    try:
        SafemergeCLI(args=args, parser_kwargs=strict)
    except argparse.ArgumentError as err:
        print(f"error: {_config_error(err, sys.argv[1:] if args is None else args)}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # the merge saved its state and said how to resume
        raise SystemExit(SIGTERM_EXIT_STATUS) from None
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
