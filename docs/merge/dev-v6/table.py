"""Per pool and variant of the runs under a folder (<pool>/<variant>/seed<N>/report.json): seeds,
ACC and ASR (mean ± std over seeds), then per backdoor (its expert's task → the target task, attack) ASR (untriggered target
rate), in report order. Run from the repository root: python docs/merge/dev-v6/table.py docs/merge/dev-v6"""

import json
import statistics
import sys
from pathlib import Path


def main(folder: Path) -> str:
    rows = ["| pool | variant | seeds | ACC | ASR | per backdoor |", "|---|---|---|---|---|---|"]
    for pool in sorted(p for p in folder.iterdir() if p.is_dir()):
        for variant in sorted(v for v in pool.iterdir() if v.is_dir()):
            reports = [json.loads(r.read_text()) for r in sorted(variant.glob("seed*/report.json"))]
            if not reports:
                continue

            def cell(values):
                values = [100 * v for v in values]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.1f} ± {spread:.1f}"

            backdoors = " · ".join(
                f"{Path(b['expert']).name.split('-')[0].removeprefix('mini_')} → {b['target_task'].removeprefix('mini_')} "
                f"{b['attack']} "
                f"{100 * statistics.mean(r['backdoors'][i]['asr'] for r in reports):.1f} "
                f"({100 * statistics.mean(r['backdoors'][i]['target_rate'] for r in reports):.1f})"
                for i, b in enumerate(reports[0]["backdoors"])
            )
            rows.append(
                f"| {pool.name} | {variant.name} | {len(reports)} | {cell(r['average']['accuracy'] for r in reports)} "
                f"| {cell(r['average']['asr'] or 0.0 for r in reports)} | {backdoors} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
