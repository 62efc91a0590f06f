"""Merge reports: ``report.json`` / ``report.md`` of one run, and comparisons across runs.

    python -m safemerge.report RUN_A/report.json RUN_B/report.json ... [--plot asr_vs_acc.png]

prints one table (runs of the same method, e.g. several seeds, are summarised as mean ± std)
and saves a plot of average ASR against average accuracy, one point per method.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from safemerge.errors import CheckpointError
from safemerge.io import read_json, write_json, write_text

REPORT_FORMAT = "safemerge-report/1"


def mean_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None if there are none."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def build_report(
    method: str,
    results: Mapping[str, Mapping[str, float | None]],
    *,
    config: Mapping[str, Any],
    runtime_s: float,
    backdoors: Sequence[Mapping[str, Any]] = (),
    defense: Mapping[str, Any] | None = None,
    attribution: Mapping[str, Any] | None = None,
    scan: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document of the contract.

    ``results``: per task ``accuracy``, ``asr`` and ``target_rate`` (the share of the clean
    images already classified as the target; both None without a backdoor on the task) and
    ``expert_accuracy`` (None if unknown); normalized accuracy is derived here. ``defense``:
    ``{"name", "params"}`` of a post-merge defence, or None; ``attribution``: which expert
    carries a simulated trigger's effect (DAM), or None; ``scan``: the pre-merge scan's
    document (``safemerge-scan/1``, :mod:`safemerge.scan`) if the merge ran it, and what it did
    with the flagged experts.
    """
    tasks = {}
    for task, r in results.items():
        expert = r.get("expert_accuracy")
        tasks[task] = {
            "accuracy": r["accuracy"],
            "asr": r.get("asr"),
            "target_rate": r.get("target_rate"),
            "expert_accuracy": expert,
            "normalized_accuracy": r["accuracy"] / expert if expert else None,
        }
    average = {
        key: mean_known([t[key] for t in tasks.values()])
        for key in ("accuracy", "asr", "target_rate", "normalized_accuracy")
    }
    return {
        "format": REPORT_FORMAT,
        "method": method,
        "tasks": tasks,
        "average": average,
        "backdoors": list(backdoors),
        "defense": dict(defense) if defense else None,
        "attribution": dict(attribution) if attribution else None,
        "scan": dict(scan) if scan else None,
        "config": dict(config),
        "runtime_s": runtime_s,
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


# How titles spell the registered methods and defences; any other name is shown as it is.
TITLES = {
    "weight_average": "Weight averaging",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "adamerging": "AdaMerging",
    "concrete_task_arithmetic": "Concrete task arithmetic",
    "concrete_adamerging": "Concrete AdaMerging",
    "dam_task_arithmetic": "DAM (task arithmetic)",
    "dam_adamerging": "DAM (AdaMerging)",
    "awm": "AWM",
    "sau": "SAU",
}


def run_title(report: Mapping[str, Any]) -> str:
    """The method, its granularity and the defence: ``AdaMerging (layer-wise) + SAU``."""
    title = TITLES.get(report["method"], report["method"])
    method = (report.get("config") or {}).get("method") or {}
    if method.get("granularity"):
        title += f" ({method['granularity']}-wise)"
    if report.get("defense"):
        title += " + " + TITLES.get(report["defense"]["name"], report["defense"]["name"])
    return title


def backdoor_name(report: Mapping[str, Any], backdoor: Mapping[str, Any]) -> str:
    """A backdoor by its expert's task and attack (``mini_fashion (optimized_patch)``); the
    expert's path stays in report.json."""
    experts = list((report.get("config") or {}).get("experts") or [])
    tasks = list(report["tasks"])
    expert = backdoor["expert"]
    task = tasks[experts.index(expert)] if expert in experts and len(experts) == len(tasks) else Path(expert).name
    return f"{task} ({backdoor['attack']})" if backdoor.get("attack") else task


def report_markdown(report: Mapping[str, Any]) -> str:
    """One run's report as a markdown table (percentages)."""
    lines = [
        f"# {run_title(report)}",
        "",
        "| task | accuracy | ASR | expert accuracy | normalized accuracy |",
        "|---|---|---|---|---|",
    ]
    rows = [*report["tasks"].items(), ("**average**", report["average"])]
    for task, r in rows:
        lines.append(
            f"| {task} | {_pct(r['accuracy'])} | {_pct(r['asr'])} | {_pct(r.get('expert_accuracy'))} "
            f"| {_pct(r['normalized_accuracy'])} |"
        )
    if report.get("backdoors"):
        lines += [
            "",
            "| backdoor (expert's task, attack) | target | ASR | untriggered target rate |",
            "|---|---|---|---|",
        ]
        for b in report["backdoors"]:
            lines.append(
                f"| {backdoor_name(report, b)} | {b['target_task']}:{b['target_class']} | {_pct(b['asr'])} "
                f"| {_pct(b.get('target_rate'))} |"
            )
    defense = report.get("defense")
    if defense:
        params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
        lines += ["", f"Defence: {defense['name']} ({params})."]
    attribution = report.get("attribution")
    if attribution:
        drops = ", ".join(f"{task} {100 * d:+.1f}" for task, d in attribution["drop"].items())
        lines += [
            "",
            f"Simulated trigger flips {_pct(attribution['flip_rate'])} % of the merge's predictions; "
            f"drop without each expert (points): {drops}; carried by {attribution['expert']} "
            f"(action: {attribution['action']}).",
        ]
    lines += ["", f"Runtime: {report['runtime_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, report: Mapping[str, Any]) -> None:
    directory = Path(directory)
    write_json(directory / "report.json", report)
    write_text(directory / "report.md", report_markdown(report))


def read_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = read_json(path)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise CheckpointError(f"{path} is not a safemerge report (format {REPORT_FORMAT!r})")
    return report


# ----------------------------------------------------------------------------- comparisons


def _stat(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return statistics.fmean(known), statistics.stdev(known) if len(known) > 1 else 0.0


def summarize(reports: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per method (in first-seen order): number of runs, and mean and std of every task's
    accuracy and ASR and of the averages. ``labels`` (one per report) groups the runs instead
    of the reports' method names, e.g. to tell a method from the same method with a defence."""
    by_method: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for i, report in enumerate(reports):
        by_method[labels[i] if labels is not None else report["method"]].append(report)
    summary = {}
    for method, runs in by_method.items():
        tasks = list(runs[0]["tasks"])
        entry = {"runs": len(runs), "tasks": {}, "average": {}}
        for task in tasks:
            entry["tasks"][task] = {
                key: _stat([r["tasks"].get(task, {}).get(key) for r in runs]) for key in ("accuracy", "asr")
            }
        for key in ("accuracy", "asr", "normalized_accuracy"):
            entry["average"][key] = _stat([r["average"][key] for r in runs])
        summary[method] = entry
    return summary


POOL_KEYS = ("accuracy", "asr", "target_rate", "normalized_accuracy")


def summarize_pools(reports: Mapping[str, Mapping[str, Mapping[int, Mapping[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Across pools: ``reports[pool][label][seed]``. Per label, each pool's average accuracy and
    ASR (mean ± std over seeds), and the mean over pools, taken per seed and then summarised
    over the seeds (a label with fewer seeds on a pool, e.g. a static method, reuses its runs)."""
    labels: list[str] = []
    for by_label in reports.values():
        labels += [label for label in by_label if label not in labels]
    summary = {}
    for label in labels:
        entry: dict[str, Any] = {"pools": {}, "average": {}}
        seeds = sorted({s for by_label in reports.values() for s in by_label.get(label, {})})
        per_seed: dict[tuple[str, int], list[float | None]] = defaultdict(list)
        for pool, by_label in reports.items():
            runs = by_label.get(label, {})
            if not runs:
                continue
            entry["pools"][pool] = {k: _stat([r["average"].get(k) for r in runs.values()]) for k in POOL_KEYS}
            for key in POOL_KEYS:
                for seed in seeds:  # a seed missing on this pool (static method) takes the pool's mean
                    run = runs.get(seed)
                    value = run["average"].get(key) if run else _stat([r["average"].get(key) for r in runs.values()])[0]
                    per_seed[key, seed].append(value)
        complete = len(entry["pools"]) == len(reports)
        for key in POOL_KEYS:
            means = [mean_known(per_seed[key, s]) for s in seeds] if complete else []
            entry["average"][key] = _stat(means)
        entry["runs"] = len(seeds)
        summary[label] = entry
    return summary


def pools_table(summary: Mapping[str, Mapping[str, Any]], pools: Sequence[str]) -> str:
    """Markdown: one row per label; per pool ``ACC / ASR (untriggered target rate)``, then the
    mean over the pools (mean ± std over seeds; — where a label did not run on every pool)."""
    header = (
        ["method", "seeds"]
        + [f"{p} ACC / ASR (untrig.)" for p in pools]
        + ["mean ACC", "mean ASR", "mean untrig.", "mean norm. ACC"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, entry in summary.items():
        runs = entry["runs"]
        cells = [label, str(runs)]
        for pool in pools:
            stats = entry["pools"].get(pool)
            cells.append(
                f"{_cell(stats['accuracy'], runs)} / {_cell(stats['asr'], runs)} ({_cell(stats['target_rate'], 1)})"
                if stats
                else "—"
            )
        cells += [_cell(entry["average"][k], runs) for k in ("accuracy", "asr", "target_rate", "normalized_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(stat: tuple[float | None, float | None], runs: int) -> str:
    mean, std = stat
    if mean is None:
        return "—"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if runs > 1 else f"{100 * mean:.1f}"


def comparison_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per method; per task ``ACC`` (and ``ASR`` where a backdoor targets
    it), then the averages; mean ± std over runs."""
    tasks: list[str] = []
    for entry in summary.values():
        tasks += [t for t in entry["tasks"] if t not in tasks]
    attacked = [
        t for t in tasks if any(e["tasks"].get(t, {}).get("asr", (None,))[0] is not None for e in summary.values())
    ]
    header = (
        ["method", "runs"]
        + [f"{t} ACC" for t in tasks]
        + [f"{t} ASR" for t in attacked]
        + ["avg ACC", "avg ASR", "avg norm. ACC"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in summary.items():
        runs = entry["runs"]
        missing = (None, None)
        cells = [method, str(runs)]
        cells += [_cell(entry["tasks"].get(t, {}).get("accuracy", missing), runs) for t in tasks]
        cells += [_cell(entry["tasks"].get(t, {}).get("asr", missing), runs) for t in attacked]
        cells += [_cell(entry["average"][k], runs) for k in ("accuracy", "asr", "normalized_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_asr_vs_accuracy(
    summary: Mapping[str, Mapping[str, Any]], path: str | Path, reference: tuple[float, float] | None = None
) -> None:
    """Average ASR against average accuracy, one point per method (error bars: std over runs);
    ``reference``: the all-clean merge's ``(accuracy, asr)`` (fractions), drawn as a point: the
    ASR that no backdoor gives, what a defence is judged against."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*Xh<>"
    for i, (method, entry) in enumerate(summary.items()):
        (acc, acc_std), (asr, asr_std) = entry["average"]["accuracy"], entry["average"]["asr"]
        if acc is None or asr is None:
            continue
        axes.errorbar(
            100 * acc,
            100 * asr,
            xerr=100 * acc_std,
            yerr=100 * asr_std,
            fmt=markers[i % len(markers)],
            capsize=3,
            label=f"{method} (n={entry['runs']})",
            alpha=0.85,
        )
    if reference is not None:
        axes.plot(100 * reference[0], 100 * reference[1], "k*", markersize=12, label="all-clean reference")
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes.set_xlabel("average clean accuracy (%)")
    axes.set_ylabel("average attack success rate (%)")
    axes.set_title("ASR against accuracy (lower right is better)", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=150)
    plt.close(figure)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safemerge.report", description="Compare merge runs (report.json files or run folders)."
    )
    parser.add_argument("reports", nargs="+", help="report.json files or output directories of merge runs")
    parser.add_argument("--plot", help="save the ASR-vs-accuracy plot to this PNG file")
    parser.add_argument("--json", help="also write the summary (mean, std per method) as JSON")
    args = parser.parse_args(argv)
    try:
        reports = [read_report(path) for path in args.reports]
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(reports)
    print(comparison_table(summary), end="")
    if args.plot:
        plot_asr_vs_accuracy(summary, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
