"""Run every method of ``configs/merge/`` over several seeds and write the comparison.

    python scripts/compare_methods.py [--seeds 0 1 2] [--methods dam_task_arithmetic ...]
        [--output outputs/compare] [-- extra trainer.py arguments]

Each run is ``python trainer.py fit --config configs/merge/base.yaml --config
configs/merge/<method>.yaml --seed_everything S``
into ``<output>/<method>/seed<S>``; runs whose report exists are skipped (delete it to redo).
Methods that learn nothing run once (their result does not depend on the seed). The table
(mean ± std over seeds) goes to ``<output>/comparison.md``, the plot to
``<output>/asr_vs_accuracy.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safemerge.io import write_text  # noqa: E402
from safemerge.report import comparison_table, plot_asr_vs_accuracy, read_report, summarize  # noqa: E402

STATIC = {"weight_average", "task_arithmetic", "ties"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="config names under configs/merge (default: all)")
    parser.add_argument("--output", default="outputs/compare")
    parser.add_argument("extra", nargs="*", help="arguments passed on to trainer.py (after --)")
    args = parser.parse_args()

    base = REPO / "configs" / "merge" / "base.yaml"
    configs = sorted(c for c in (REPO / "configs" / "merge").glob("*.yaml") if c != base)
    methods = args.methods or [c.stem for c in configs]
    output = Path(args.output)
    reports = []
    for method in methods:
        for seed in args.seeds[:1] if method in STATIC else args.seeds:
            run = output / method / f"seed{seed}"
            if not (run / "report.json").is_file():
                command = [
                    sys.executable, str(REPO / "trainer.py"), "fit", "--config", str(base),
                    "--config", str(REPO / "configs" / "merge" / f"{method}.yaml"),
                    f"--seed_everything={seed}", f"--model.init_args.output_dir={run}",
                    f"--trainer.default_root_dir={run}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                    *args.extra,
                ]
                start = time.time()
                print(f"{method} seed {seed} ...", flush=True)
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                print(f"  {time.time() - start:.0f} s", flush=True)
            reports.append(read_report(run))
    summary = summarize(reports)
    table = comparison_table(summary)
    write_text(output / "comparison.md", table)
    plot_asr_vs_accuracy(summary, output / "asr_vs_accuracy.png")
    print(table)


if __name__ == "__main__":
    main()
