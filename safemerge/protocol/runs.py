"""Merge runs as ``trainer.py fit`` commands: methods × options × pools × seeds, then the
comparison table and plot (``scripts/compare_methods.py``; ``scripts/paper_grid.py`` runs its
grid through :func:`run_and_compare` too).

A method is a config of ``configs/merge/`` followed by options joined with ``+``, each a config
of ``configs/defense/`` (a post-merge defence) or ``configs/dam/`` (a DAM variant):
``task_arithmetic+sau`` is ``--config configs/merge/task_arithmetic.yaml --config
configs/defense/sau.yaml``. Each run is ``python trainer.py fit --config configs/merge/base.yaml
[--config configs/pools/<pool>.yaml] --config <method and options> --seed_everything S`` into
``<output>[/<pool>]/<method>/seed<S>``; runs whose report exists are skipped (delete it to redo).
Methods that learn nothing run once (their result does not depend on the seed). Per pool, the
table (mean ± std over seeds) goes to ``comparison.md`` and the plot to ``asr_vs_accuracy.png``;
with several pools, ``<output>/comparison.md`` and ``<output>/asr_vs_accuracy.png`` also give
each pool's averages and their mean over the pools.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from safemerge.errors import ConfigError
from safemerge.io import write_text
from safemerge.merging import StaticMerge
from safemerge.protocol import exits_on_user_error
from safemerge.protocol.configs import composed
from safemerge.protocol.pools import CONFIGS, pool_file
from safemerge.report import (
    comparison_table,
    plot_asr_vs_accuracy,
    pools_table,
    read_report,
    summarize,
    summarize_pools,
)

REPO = CONFIGS.parent
BASE = CONFIGS / "merge" / "base.yaml"
OPTION_FOLDERS = ("defense", "dam")


def learns(configs: Sequence[Path]) -> bool:
    """Whether the merge of ``configs`` learns anything: a defence, or a method that is not a
    :class:`~safemerge.merging.StaticMerge` (read from the method's ``class_path``)."""
    init = composed(configs)["model"]["init_args"]
    if init.get("defense"):
        return True
    module, _, name = init["method"]["class_path"].rpartition(".")
    return not issubclass(getattr(importlib.import_module(module), name), StaticMerge)


def seeds_of(configs: Sequence[Path], seeds: Sequence[int]) -> Sequence[int]:
    """A merge that learns nothing runs once: its result does not depend on the seed (a
    defence on top of a static method learns, so it runs every seed)."""
    return seeds if learns(configs) else seeds[:1]


def method_configs(method: str) -> list[Path]:
    """The config files of ``name[+option...]``: ``configs/merge/<name>.yaml``, then each
    option from ``configs/defense/`` or ``configs/dam/``."""
    name, *options = method.split("+")
    configs = [CONFIGS / "merge" / f"{name}.yaml"]
    if name == "base" or not configs[0].is_file():
        known = sorted(c.stem for c in configs[0].parent.glob("*.yaml") if c.stem != "base")
        raise ConfigError(f"unknown method {name!r} in {method!r}; methods: {', '.join(known)}")
    for option in options:
        found = [CONFIGS / d / f"{option}.yaml" for d in OPTION_FOLDERS if (CONFIGS / d / f"{option}.yaml").is_file()]
        if not found:
            known = sorted(c.stem for d in OPTION_FOLDERS for c in (CONFIGS / d).glob("*.yaml"))
            raise ConfigError(
                f"unknown option {option!r} in {method!r}; options (configs/defense, configs/dam): {', '.join(known)}"
            )
        configs.append(found[0])
    return configs


def merge_command(
    configs: Sequence[Path | str], seed: int, run: Path, extra: Sequence[str] = (), *, logger: bool = False
) -> list[str]:
    """``trainer.py fit`` of one merge run into ``run`` (its report, merged tower and logs);
    without ``logger`` the configs' logger (W&B) is switched off."""
    return [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        *[a for c in configs for a in ("--config", str(c))],
        f"--seed_everything={seed}",
        f"--model.init_args.output_dir={run}",
        f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false",
        *([] if logger else ["--trainer.logger=false"]),
        *extra,
    ]


def run(command: Sequence[str], *, dry_run: bool, env: Mapping[str, str] | None = None, label: str = "") -> None:
    """Print a command (``dry_run``) or run it, failing loudly."""
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    if dry_run:
        print(prefix + shlex.join(command), flush=True)
        return
    start = time.time()
    print(f"{label} ...", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    print(f"  {time.time() - start:.0f} s", flush=True)


def run_and_compare(
    jobs: Sequence[tuple[str, int, list[str]]],
    output: Path,
    *,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
    reference: tuple[float, float] | None = None,
) -> str | None:
    """Run each ``(method, seed, command)`` whose ``<output>/<method>/seed<seed>/report.json`` is
    missing, then write the comparison table and plot of all of them (``reference``: the
    all-clean merge's accuracy and ASR, a point on the plot); returns the table."""
    runs = []
    for method, seed, command in jobs:
        directory = output / method / f"seed{seed}"
        if dry_run or not (directory / "report.json").is_file():
            run(command, dry_run=dry_run, env=env, label=f"{method} seed {seed}")
        runs.append(directory)
    if dry_run:
        return None
    summary = summarize([read_report(directory) for directory in runs], labels=[method for method, _, _ in jobs])
    table = comparison_table(summary)
    write_text(output / "comparison.md", table)
    plot_asr_vs_accuracy(summary, output / "asr_vs_accuracy.png", reference)
    return table


def all_clean_points(path: str | Path, pools: Sequence[str], scaling: str = "0.3") -> dict[str, tuple[float, float]]:
    """Each pool's all-clean reference ``(accuracy, asr)`` from ``all_clean_reference.json``
    (task arithmetic at λ ``scaling``); a one-line error for a file that lacks a pool."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--reference {path}: not a readable all_clean_reference.json ({error})") from None
    points = {}
    for pool in pools:
        entry = data.get(pool, {}).get("task_arithmetic", {}).get(scaling)
        if entry is None:
            raise ConfigError(
                f"--reference {path} has no all-clean merge of pool {pool!r} at λ {scaling}: "
                f"run python scripts/all_clean_reference.py --pools {pool}"
            )
        points[pool] = (entry["average"]["accuracy"], entry["average"]["asr"])
    return points


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="name[+option...] (default: every config under configs/merge)")
    parser.add_argument("--pools", nargs="+", help="configs/pools names (default: the pool of configs/merge/base.yaml)")
    parser.add_argument("--output", default="outputs/compare")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument(
        "--reference",
        help="all_clean_reference.json (scripts/all_clean_reference.py): each pool's all-clean merge "
        "(task arithmetic, λ 0.3) drawn on its plot as a point",
    )
    parser.add_argument("extra", nargs="*", help="arguments passed on to trainer.py (after --)")
    args = parser.parse_args(argv)

    methods = args.methods or [c.stem for c in sorted((CONFIGS / "merge").glob("*.yaml")) if c != BASE]
    configs = {method: method_configs(method) for method in methods}  # unknown names fail before any run
    seeds = {method: seeds_of([BASE, *configs[method]], args.seeds) for method in methods}
    pools = {pool: [pool_file(pool)] for pool in args.pools} if args.pools else {"": []}
    output = Path(args.output)
    references = all_clean_points(args.reference, list(pools)) if args.reference else {}
    per_pool = {}
    for pool, pool_configs in pools.items():
        directory = output / pool
        jobs = [
            (
                method,
                seed,
                merge_command(
                    [BASE, *pool_configs, *configs[method]], seed, directory / method / f"seed{seed}", args.extra
                ),
            )
            for method in methods
            for seed in seeds[method]
        ]
        table = run_and_compare(jobs, directory, dry_run=args.dry_run, reference=references.get(pool))
        if args.dry_run:
            continue
        print(f"## {pool or 'base pool'}\n\n{table}")
        per_pool[pool] = {
            method: {seed: read_report(directory / method / f"seed{seed}") for seed in seeds[method]}
            for method in methods
        }
    if len(per_pool) > 1:
        summary = summarize_pools(per_pool)
        table = pools_table(summary, list(pools))
        write_text(output / "comparison.md", table)
        points = [references[p] for p in pools if p in references]
        mean = tuple(sum(x) / len(points) for x in zip(*points)) if len(points) == len(pools) else None
        plot_asr_vs_accuracy(summary, output / "asr_vs_accuracy.png", mean)
        print(f"## mean over {', '.join(pools)}\n\n{table}")


if __name__ == "__main__":
    main()
