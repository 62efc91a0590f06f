"""Markdown tables of the protocol's results: the all-clean reference and the mini benchmark.
(Tables of merge reports, mean ± std over seeds and pools, are :mod:`safemerge.report`'s.)"""

from __future__ import annotations

from safemerge.experts import MINI_BACKDOORS


def pct(x: float | None) -> str:
    """A rate in percent with one decimal; ``—`` when unknown."""
    return "—" if x is None else f"{100 * x:.1f}"


def average_accuracy(per_task: dict) -> float:
    return sum(r["accuracy"] for r in per_task.values()) / len(per_task)


def reference_table(results: dict) -> str:
    """One row per pool and λ of :func:`safemerge.protocol.reference.reference_for`'s results."""
    lines = ["| pool | λ | ACC | ASR (untriggered) | per backdoor: ASR (untriggered) |", "|---|---|---|---|---|"]
    for pool, result in results.items():
        for lam, merged in result["task_arithmetic"].items():
            average = merged["average"]
            each = ", ".join(
                f"{b['expert']}: {pct(r['asr'])} ({pct(r['target_rate'])})"
                for b, r in zip(result["backdoors"], merged["backdoors"])
            )
            lines.append(
                f"| {pool} | {lam} | {pct(average['accuracy'])} | {pct(average['asr'])} "
                f"({pct(average['target_rate'])}) | {each} |"
            )
    return "\n".join(lines)


def phenomena_table(results: dict) -> str:
    """The mini benchmark's phenomena side by side with real CLIP ViT-B/32 on the 8-task benchmark."""
    real = results["real_clip_reference"]
    zero_shot = average_accuracy(results["zero_shot"]["test"])
    experts = average_accuracy(results["experts"])
    ta = results["task_arithmetic_default"]
    ta_acc = average_accuracy(ta["test"])
    names = results["tasks"]
    ta_norm = sum(ta["test"][n]["accuracy"] / results["experts"][n]["accuracy"] for n in names) / len(names)
    ada = results.get("adamerging_default")
    ada_acc = average_accuracy(ada["test"]) if ada else None
    bad = [s for s in results["backdoored_experts"] if "feature_interpolation" in str(MINI_BACKDOORS.get(s))]
    ta_asr = ", ".join(
        f"{s} → {ta['backdoors'][s]['target_task']}: {pct(ta['backdoors'][s]['asr'])} "
        f"({pct(ta['backdoors'][s]['target_rate'])})"
        for s in bad
    )
    rows = [
        (
            "zero-shot → experts (avg ACC)",
            f"{pct(real['zero_shot_acc'])} → {pct(real['experts_acc'])}",
            f"{pct(zero_shot)} → {pct(experts)}",
        ),
        (
            f"task arithmetic (λ {ta['lambda']} on val): avg ACC, normalized",
            f"{pct(real['ta_acc'])}, {pct(real['ta_normalized'])}",
            f"{pct(ta_acc)}, {pct(ta_norm)}",
        ),
        (
            "layer-wise AdaMerging − task arithmetic",
            f"+{pct(real['adamerging_minus_ta'])}",
            "—" if ada_acc is None else f"{100 * (ada_acc - ta_acc):+.1f}",
        ),
        ("BadMerging experts' ASR in the TA merge (untriggered)", f"{real['badmerging_ta_asr']}", ta_asr or "—"),
    ]
    return "\n".join(
        ["| | real CLIP ViT-B/32 | mini v2 |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    )


def _accuracy_rows(results: dict) -> list[str]:
    names = results["tasks"]
    lines = ["| | " + " | ".join(names) + " | avg ACC |", "|---" * (len(names) + 2) + "|"]

    def row(label, per_task):
        values = [per_task.get(n, {}).get("accuracy") for n in names]
        known = [v for v in values if v is not None]
        if known:
            lines.append(f"| {label} | " + " | ".join(pct(v) for v in values) + f" | {pct(sum(known) / len(known))} |")

    lines.append("| chance | " + " | ".join(pct(results["chance"][n]) for n in names) + " | |")
    row("zero-shot", results["zero_shot"]["test"])
    row("clean experts", results["experts"])
    row("backdoored experts", results["backdoored_experts"])
    for key, label in (
        ("task_arithmetic_clean", "TA, all-clean pool"),
        ("task_arithmetic_default", "TA, default pool"),
        ("ties_clean", "TIES, all-clean pool"),
        ("ties_default", "TIES, default pool"),
    ):
        row(f"{label} (λ {results[key]['lambda']})", results[key]["test"])
    ada = results.get("adamerging_default", {}).get("test", {})
    if ada:
        row(f"layer-wise AdaMerging, default pool ({len(results['adamerging_default']['seeds'])} seeds)", ada)
    return lines


def _backdoor_rows(results: dict) -> list[str]:
    ada = results.get("adamerging_default", {}).get("test", {})
    lines = [
        "| backdoor (expert → target task) | alone | TA default | TIES default | AdaMerging default | "
        "TA all-clean | zero-shot |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(entry):
        return f"{pct(entry['asr'])} ({pct(entry['target_rate'])})"

    for source, attack in MINI_BACKDOORS.items():
        if source not in results["backdoored_experts"]:
            continue
        alone = results["backdoored_experts"][source]
        target = alone["target_task"]
        cells = [cell(alone)] + [
            cell(results[k]["backdoors"][source]) for k in ("task_arithmetic_default", "ties_default")
        ]
        cells += [cell(ada[target]) if ada.get(target, {}).get("asr") is not None else "—"]
        cells += [
            cell(results["task_arithmetic_clean"]["backdoors"][source]),
            cell(results["zero_shot"]["backdoors"][source]),
        ]
        lines.append(f"| {attack['class_path'].rsplit('.', 1)[-1]} {source} → {target} | " + " | ".join(cells) + " |")
    lines.append("\nASR (untriggered target rate) in %.")
    return lines


def _diagnostic_rows(results: dict) -> list[str]:
    diag = results["diagnostics"]
    lines = [
        f"| expert | ‖τ‖/‖θ0‖ | own gain at λ {diag['single_expert_lambda']} | others' mean change | "
        "others' worst | max cosine to another τ |",
        "|---|---|---|---|---|---|",
    ]
    for i, n in enumerate(results["tasks"]):
        s = diag["single_expert"][n]
        cos = max(c for j, c in enumerate(diag["cosine"][i]) if j != i)
        lines.append(
            f"| {n} | {diag['relative_norm'][n]:.3f} | {pct(s['own_gain'])} | {pct(s['others_mean_change'])} | "
            f"{pct(s['others_worst_change'])} | {cos:.3f} |"
        )
    return lines


def benchmark_tables(results: dict) -> str:
    """Every table of a mini benchmark run (``results.json``)."""
    return "\n".join(
        [
            phenomena_table(results),
            "",
            *_accuracy_rows(results),
            "",
            *_backdoor_rows(results),
            "",
            *_diagnostic_rows(results),
        ]
    )
