"""The paper-scale grid: fine-tune a pool's experts once, then merge it with every method × seed,
and write the comparison table and plot.

    python scripts/paper_grid.py --experts /data/experts --data /data/datasets \\
        [--model ViT-B-32] [--pool badmerging] [--attack badmerging_on_task] [--adversary cifar100] \\
        [--methods dam_adamerging ...] [--seeds 0 1 2] [--output outputs/paper] [--dry-run]

Layout of the expert root (``--experts``): ``<experts>/<model>/<task>`` for the clean experts,
``<experts>/<model>/<task>-<attack>`` for a backdoored one. Fine-tuning is
``configs/paper/finetune.yaml`` + ``models/<model>.yaml`` (+ ``attacks/<attack>.yaml``); an expert
whose ``expert.json`` exists is not fine-tuned again. Each merge is ``configs/paper/merge.yaml``
+ ``pools/<pool>.yaml`` + ``methods/<method>.yaml`` with the adversary's clean expert swapped for
its backdoored one, into ``<output>/<model>/<pool>/<attack>/<method>/seed<S>``; the table and the
plot go beside (``comparison.md``, ``asr_vs_accuracy.png``), through the same code as
``scripts/compare_methods.py``. ``--dry-run`` prints every command instead of running it.
``--finetune-args`` / ``--merge-args`` pass extra ``trainer.py`` arguments (e.g. fewer steps).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from safemerge.errors import ConfigError
from safemerge.protocol import exits_on_user_error
from safemerge.protocol.pools import PAPER_POOLS, pool_experts
from safemerge.protocol.runs import CONFIGS, REPO, merge_command, run, run_and_compare, seeds_of

PAPER = CONFIGS / "paper"
ATTACKS = ("badmerging_on_task", "badmerging_off_task", "badnets")
EXPERTS_VARIABLE = "SAFEMERGE_EXPERTS"


def pool_tasks(pool: str) -> list[str]:
    """The tasks of a paper pool, read from its config (``$SAFEMERGE_EXPERTS/<task>`` entries)."""
    return [Path(e).name for e in pool_experts(pool, PAPER_POOLS)]


def finetune_command(
    model: str,
    pretrained: str,
    task: str,
    attack: str | None,
    output: Path,
    logs: Path,
    data: str | None,
    extra: Sequence[str],
) -> list[str]:
    configs = [PAPER / "finetune.yaml"]
    if (PAPER / "models" / f"{model}.yaml").is_file():
        configs.append(PAPER / "models" / f"{model}.yaml")
    if attack:
        configs.append(PAPER / "attacks" / f"{attack}.yaml")
    return [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        *[a for c in configs for a in ("--config", str(c))],
        f"--model.init_args.model={model}",
        f"--model.init_args.pretrained={pretrained}",
        f"--data.init_args.task={task}",
        f"--model.init_args.output_dir={output}",
        f"--trainer.default_root_dir={logs}",
        "--trainer.enable_progress_bar=false",
        *([f"--data.init_args.root={data}"] if data else []),
        *extra,
    ]


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", required=True, help="root of the expert directories (layout above)")
    parser.add_argument("--data", help="dataset root (data.init_args.root); built-in tasks need none")
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip name (configs/paper/models/<model>.yaml if present)"
    )
    parser.add_argument("--pretrained", default="openai", help="pretrained tag or weights file of the model")
    parser.add_argument("--pool", default="badmerging", help="configs/paper/pools/<pool>.yaml")
    parser.add_argument("--attack", default="badmerging_on_task", choices=[*ATTACKS, "clean"])
    parser.add_argument("--adversary", help="the task whose expert is backdoored (default: the pool's first)")
    parser.add_argument("--methods", nargs="+", help="configs/paper/methods/<method>.yaml (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="outputs/paper")
    parser.add_argument(
        "--large", action="store_true", help="add configs/paper/large.yaml (memory options, ViT-L-14 x 8)"
    )
    parser.add_argument("--finetune-args", default="", help="extra trainer.py arguments of the fine-tuning runs")
    parser.add_argument("--merge-args", default="", help="extra trainer.py arguments of the merge runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    tasks = pool_tasks(args.pool)
    attack = None if args.attack == "clean" else args.attack
    adversary = args.adversary or tasks[0]
    if adversary not in tasks:
        raise ConfigError(f"adversary {adversary!r} is not in pool {args.pool} ({', '.join(tasks)})")
    methods = args.methods or [p.stem for p in sorted((PAPER / "methods").glob("*.yaml"))]
    for method in methods:
        if not (PAPER / "methods" / f"{method}.yaml").is_file():
            raise ConfigError(f"no configs/paper/methods/{method}.yaml")
    experts = Path(args.experts).expanduser().resolve() / args.model
    finetune_pool(args, experts, tasks, attack, adversary)

    # methods x seeds over the pool, the adversary's backdoored expert in place of its clean one
    pool = [
        f"${EXPERTS_VARIABLE}/{task}-{attack}" if attack and task == adversary else f"${EXPERTS_VARIABLE}/{task}"
        for task in tasks
    ]
    output = Path(args.output) / args.model / args.pool / args.attack
    configs = [PAPER / "merge.yaml", PAPER / "pools" / f"{args.pool}.yaml"] + (
        [PAPER / "large.yaml"] if args.large else []
    )
    extra = [
        "--model.init_args.experts=[" + ",".join(pool) + "]",
        *([f"--data.init_args.root={args.data}"] if args.data else []),
        *shlex.split(args.merge_args),
    ]
    jobs = [
        (
            method,
            seed,
            merge_command(
                [*configs, PAPER / "methods" / f"{method}.yaml"],
                seed,
                output / method / f"seed{seed}",
                extra,
                logger=True,
            ),
        )
        for method in methods
        for seed in seeds_of([*configs, PAPER / "methods" / f"{method}.yaml"], args.seeds)
    ]
    table = run_and_compare(jobs, output, dry_run=args.dry_run, env={EXPERTS_VARIABLE: str(experts)})
    if table:
        print(table)
        print(f"table: {output / 'comparison.md'}  plot: {output / 'asr_vs_accuracy.png'}")


def finetune_pool(
    args: argparse.Namespace, experts: Path, tasks: list[str], attack: str | None, adversary: str
) -> None:
    """The pool, fine-tuned once: every clean expert and the adversary's backdoored one."""
    wanted = [(task, None) for task in tasks] + ([(adversary, attack)] if attack else [])
    for task, task_attack in wanted:
        directory = experts / (f"{task}-{task_attack}" if task_attack else task)
        if args.dry_run or not (directory / "expert.json").is_file():
            logs = Path(args.output) / args.model / "finetune" / directory.name
            command = finetune_command(
                args.model,
                args.pretrained,
                task,
                task_attack,
                directory,
                logs,
                args.data,
                shlex.split(args.finetune_args),
            )
            run(command, dry_run=args.dry_run, label=f"fine-tune {directory.name}")


if __name__ == "__main__":
    main()
