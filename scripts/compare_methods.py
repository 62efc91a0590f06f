"""Run every method of ``configs/merge/`` over several seeds and write the comparison.

    python scripts/compare_methods.py [--seeds 0 1 2] [--methods dam_task_arithmetic ...]
        [--output outputs/compare] [-- extra trainer.py arguments]

Each run is ``python trainer.py fit --config configs/merge/base.yaml --config
configs/merge/<method>.yaml --seed_everything S``
into ``<output>/<method>/seed<S>``; runs whose report exists are skipped (delete it to redo).
Methods that learn nothing run once (their result does not depend on the seed). The table
(mean ± std over seeds) goes to ``<output>/comparison.md``, the plot to
``<output>/asr_vs_accuracy.png``. ``scripts/paper_grid.py`` runs its grid through
:func:`run_and_compare` too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safemerge.io import write_text  # noqa: E402
from safemerge.report import comparison_table, plot_asr_vs_accuracy, read_report, summarize  # noqa: E402

STATIC = {"weight_average", "task_arithmetic", "ties"}


def seeds_of(method: str, seeds: Sequence[int]) -> Sequence[int]:
    """Methods that learn nothing run once: their result does not depend on the seed."""
    return seeds[:1] if method in STATIC else seeds


def merge_command(
    configs: Sequence[Path | str], seed: int, run: Path, extra: Sequence[str] = (), *, logger: bool = False,
) -> list[str]:
    """``trainer.py fit`` of one merge run into ``run`` (its report, merged tower and logs);
    without ``logger`` the configs' logger (W&B) is switched off."""
    return [
        sys.executable, str(REPO / "trainer.py"), "fit", *[a for c in configs for a in ("--config", str(c))],
        f"--seed_everything={seed}", f"--model.init_args.output_dir={run}", f"--trainer.default_root_dir={run}",
        "--trainer.enable_progress_bar=false", *([] if logger else ["--trainer.logger=false"]), *extra,
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
    jobs: Sequence[tuple[str, int, list[str]]], output: Path, *, dry_run: bool = False, env: Mapping[str, str] | None = None,
) -> str | None:
    """Run each ``(method, seed, command)`` whose ``<output>/<method>/seed<seed>/report.json`` is
    missing, then write the comparison table and plot of all of them; returns the table."""
    runs = []
    for method, seed, command in jobs:
        directory = output / method / f"seed{seed}"
        if dry_run or not (directory / "report.json").is_file():
            run(command, dry_run=dry_run, env=env, label=f"{method} seed {seed}")
        runs.append(directory)
    if dry_run:
        return None
    summary = summarize([read_report(directory) for directory in runs])
    table = comparison_table(summary)
    write_text(output / "comparison.md", table)
    plot_asr_vs_accuracy(summary, output / "asr_vs_accuracy.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="config names under configs/merge (default: all)")
    parser.add_argument("--output", default="outputs/compare")
    parser.add_argument("extra", nargs="*", help="arguments passed on to trainer.py (after --)")
    args = parser.parse_args()

    base = REPO / "configs" / "merge" / "base.yaml"
    methods = args.methods or [c.stem for c in sorted((REPO / "configs" / "merge").glob("*.yaml")) if c != base]
    output = Path(args.output)
    jobs = [
        (method, seed, merge_command([base, REPO / "configs" / "merge" / f"{method}.yaml"], seed, output / method / f"seed{seed}", args.extra))
        for method in methods for seed in seeds_of(method, args.seeds)
    ]
    print(run_and_compare(jobs, output))


if __name__ == "__main__":
    main()
