"""Measure the pre-merge scan (:mod:`safemerge.scan`) on expert pools.

    python scripts/scan_pools.py --pools mini_default mini_heldout_blended mini_heldout_offtask \\
        mini_heldout_two mini_clean --output scan-results/

For every pool (``configs/pools/<name>.yaml``, experts resolved through
:func:`safemerge.experts.resolve_expert`) it runs :func:`safemerge.scan.scan_experts` and writes
``<output>/<pool>.scan.json`` (the scan's own JSON), ``<output>/scan_pools.json`` and
``<output>/scan_pools.md``: per pool each backdoored expert's rank and score, the highest clean
score, the false alarms at the threshold, the ranking AUROC (backdoored vs clean experts of the
pool), the seconds it took; and the AUROC over all pools' experts pooled. Only here is the truth
read (each expert.json's ``backdoor`` record): it labels the scan, the scan never sees it. Pools
that share experts invert each expert's triggers once (the seconds of a later pool exclude them).
``--reuse DIR`` re-flags the ``<pool>.scan.json`` of an earlier run at ``--threshold`` instead of
scanning again (scores do not depend on the threshold).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, without installing it

import yaml  # noqa: E402

from safemerge.errors import ConfigError, SafemergeError  # noqa: E402
from safemerge.experts import resolve_experts  # noqa: E402
from safemerge.io import read_expert, read_json, write_json, write_text  # noqa: E402
from safemerge.scan import DEFAULT_IMAGES, DEFAULT_THRESHOLD, scan_document, scan_experts  # noqa: E402

POOLS = Path(__file__).resolve().parents[1] / "configs" / "pools"


def pool_references(name: str) -> list[str]:
    path = POOLS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in POOLS.glob("*.yaml")))
        raise ConfigError(f"no pool file {path}; pools: {known}")
    return list(yaml.safe_load(path.read_text())["model"]["init_args"]["experts"])


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """P(score of a backdoored expert > score of a clean one), ties counting half; None if a side is empty."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def measure(name: str, threshold: float, images: int, seed: int, memo: dict, reuse: Path | None) -> tuple[dict, dict]:
    references = pool_references(name)
    directories = resolve_experts(references, "cpu")
    start = time.time()
    if reuse is not None:  # re-flag an earlier scan of the pool at this threshold (the scores do not depend on it)
        earlier = read_json(reuse / f"{name}.scan.json")
        scan = scan_document(earlier["experts"], threshold)
    else:
        scan = scan_experts(directories, threshold=threshold, images=images, seed=seed, memo=memo)
    seconds = earlier.get("seconds", 0.0) if reuse is not None else time.time() - start
    scan["seconds"] = round(seconds, 1)
    truth = {d: read_expert(d).backdoor for d in directories}  # the label: read here only
    reference_of = dict(zip(directories, references))
    backdoored, clean = [], []
    for rank, expert in enumerate(scan["experts"], 1):
        record = truth[expert["path"]]
        row = {
            "expert": reference_of[expert["path"]],
            "rank": rank,
            "score": expert["score"],
            "flagged": expert["flagged"],
        }
        if record:
            row["truth"] = (
                f"{record['attack']} -> {record.get('target_task') or expert['task']}:{record['target_class']}"
            )
            row["suspected"] = f"{expert['evidence']['target_task']}:{expert['evidence']['target_class']}"
            backdoored.append(row)
        else:
            clean.append(row)
    figures = {
        "pool": name,
        "backdoored": backdoored,
        "highest_clean_score": max(r["score"] for r in clean) if clean else None,
        "false_alarms": [r["expert"] for r in clean if r["flagged"]],
        "missed": [r["expert"] for r in backdoored if not r["flagged"]],
        "auroc": auroc([r["score"] for r in backdoored], [r["score"] for r in clean]),
        "seconds": round(seconds, 1),
        "scores": {"backdoored": [r["score"] for r in backdoored], "clean": [r["score"] for r in clean]},
    }
    return figures, scan


def markdown(results: list[dict], pooled: float | None, threshold: float) -> str:
    lines = [
        f"Scan (threshold {threshold}): backdoored experts' rank/score, highest clean score, false alarms, AUROC.",
        "",
        "| pool | backdoored expert (truth; suspected target) | rank | score | flagged | highest clean | false alarms | AUROC | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["backdoored"] or [None]
        for i, b in enumerate(rows):
            expert = f"{b['expert']} ({b['truth']}; {b['suspected']})" if b else "(none)"
            rank, score, flagged = (
                (b["rank"], f"{b['score']:.3f}", "yes" if b["flagged"] else "no") if b else ("", "", "")
            )
            tail = ["", "", "", ""]
            if i == 0:
                clean = r["highest_clean_score"]
                tail = [
                    "" if clean is None else f"{clean:.3f}",
                    ", ".join(r["false_alarms"]) or "none",
                    "n/a" if r["auroc"] is None else f"{r['auroc']:.2f}",
                    f"{r['seconds']:.0f}",
                ]
            lines.append(
                f"| {r['pool'] if i == 0 else ''} | {expert} | {rank} | {score} | {flagged} | "
                + " | ".join(tail)
                + " |"
            )
    lines += [
        "",
        f"Pooled AUROC (every pool's backdoored vs clean experts): {'n/a' if pooled is None else f'{pooled:.3f}'}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", nargs="+", required=True, help="pool names under configs/pools/")
    parser.add_argument("--output", required=True, help="folder for the tables")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--images", type=int, default=None, help="images per task (default: the scan's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", default=None, help="a folder of earlier <pool>.scan.json: re-flag them, no new scan")
    args = parser.parse_args(argv)
    output = Path(args.output)
    memo: dict = {}
    reuse = Path(args.reuse) if args.reuse else None
    results = []
    try:
        for name in args.pools:
            figures, scan = measure(name, args.threshold, args.images or DEFAULT_IMAGES, args.seed, memo, reuse)
            write_json(output / f"{name}.scan.json", scan)
            results.append(figures)
            print(f"{name}: AUROC {figures['auroc']}, {figures['seconds']} s", flush=True)
    except SafemergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pooled = auroc(
        [s for r in results for s in r["scores"]["backdoored"]], [s for r in results for s in r["scores"]["clean"]]
    )
    write_json(output / "scan_pools.json", {"threshold": args.threshold, "pools": results, "pooled_auroc": pooled})
    write_text(output / "scan_pools.md", markdown(results, pooled, args.threshold))
    print(markdown(results, pooled, args.threshold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
