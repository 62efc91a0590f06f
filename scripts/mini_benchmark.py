"""The mini benchmark's phenomena table: does merging behave as on real CLIP?

    python scripts/mini_benchmark.py [--seeds 0 1 2] [--output outputs/mini_benchmark]

Measures, on the default mini pool (six tasks on six domains, three backdoored experts) and its
all-clean twin, test splits: zero-shot, experts, task arithmetic (λ chosen on the val splits),
TIES, layer-wise AdaMerging (``configs/merge/base.yaml`` + ``adamerging.yaml`` through ``trainer.py``, one run
per seed), every backdoor's ASR alone / in the TA merge / in the AdaMerging merge / in the
all-clean merge, each beside its *untriggered target rate* (the share of the same clean images
already classified as the target), and the diagnostics that explain a merging basin or its
absence: task-vector norms relative to the base, their pairwise cosines, and each expert added
alone at λ (its own task's gain, the mean change on the other tasks). Experts come from the
cache (fine-tuned on first use). Writes ``<output>/results.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from safemerge.attacks import Trigger  # noqa: E402
from safemerge.data import get_task  # noqa: E402
from safemerge.data.mini_v2 import domain_task_names  # noqa: E402
from safemerge.evaluation import Backdoor, classifier_for, evaluate, evaluate_backdoors  # noqa: E402
from safemerge.experts import MINI_BACKDOORS, MINI_MODEL, MINI_RECIPE, MINI_WEIGHTS, ensure_expert, mini_pool  # noqa: E402
from safemerge.io import read_expert, write_json  # noqa: E402
from safemerge.merging import task_arithmetic, task_vectors, ties_merging  # noqa: E402
from safemerge.models import load_clip  # noqa: E402
from safemerge.report import mean_known, read_report  # noqa: E402

from compare_methods import merge_command, run as run_command  # noqa: E402  (scripts/, beside this file)

TA_LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)  # task arithmetic's scaling, chosen on val as the literature does
TIES_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
SINGLE_LAMBDA = 0.3  # each expert added alone at this scaling (the diagnostics)
# Real CLIP ViT-B/32, 8 tasks: AdaMerging paper (ACC) and BadMerging (ASR of its experts in a TA merge).
REAL_CLIP = {
    "zero_shot_acc": 0.483, "experts_acc": 0.905, "ta_acc": 0.691, "ta_normalized": 0.76,
    "adamerging_acc": 0.801, "adamerging_minus_ta": 0.110, "badmerging_ta_asr": "> 90",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="AdaMerging seeds (none: skip it)")
    parser.add_argument("--output", default="outputs/mini_benchmark")
    parser.add_argument("--weights", default=MINI_WEIGHTS, help="base weights: a pretrained tag or file (recipe search)")
    parser.add_argument("--lr", type=float, default=MINI_RECIPE["lr"], help="expert learning rate (recipe search)")
    parser.add_argument("--steps", type=int, default=MINI_RECIPE["max_steps"], help="expert steps (recipe search)")
    parser.add_argument("--tuned-blocks", type=int, default=MINI_RECIPE["tuned_blocks"],
                        help="tune only the last N blocks (recipe search; -1: every block)")
    parser.add_argument("--clean-only", action="store_true", help="skip the backdoored experts (recipe search)")
    parser.add_argument("--tables", metavar="RESULTS_JSON", help="only print the tables of a finished run")
    args = parser.parse_args()
    if args.tables:
        return print_tables(args.tables)
    output = Path(args.output)

    start = time.time()
    names = domain_task_names()
    tasks = [get_task(name) for name in names]
    clip = load_clip(MINI_MODEL, args.weights)
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    classifier = classifier_for(clip, tasks)

    timings, clean, backdoored = {}, {}, {}
    recipe = {"pretrained": args.weights, "lr": args.lr, "max_steps": args.steps,
              "warmup_steps": min(MINI_RECIPE["warmup_steps"], args.steps // 5), "tuned_blocks": None if args.tuned_blocks == -1 else args.tuned_blocks}
    for clean_spec, poisoned_spec in zip(mini_pool(False, **recipe), mini_pool(not args.clean_only, **recipe)):
        t0 = time.time()
        clean[clean_spec.task] = read_expert(ensure_expert(clean_spec))
        timings[clean_spec.task] = time.time() - t0
        if poisoned_spec.attack is not None:
            t0 = time.time()
            backdoored[poisoned_spec.task] = read_expert(ensure_expert(poisoned_spec))
            timings[f"{poisoned_spec.task}:backdoored"] = time.time() - t0
    backdoors = {
        source: Backdoor(Trigger.from_tensors(e.trigger), e.backdoor["target_task"], e.backdoor["target_class"])
        for source, e in backdoored.items()
    }

    def run(state):
        """Per task ACC, ASR and untriggered target rate, and every backdoor's own pair, in one pass."""
        per_task, rates = evaluate_backdoors(classifier, tasks, list(backdoors.values()), tower_state=state,
                                             image_size=clip.image_size)
        per_backdoor = {source: {"target_task": b.target_task, **r} for (source, b), r in zip(backdoors.items(), rates)}
        return {"test": per_task, "backdoors": per_backdoor}

    def own_task(state, name):
        """An expert on its own task only: ACC, nothing else to measure."""
        return evaluate(classifier, [get_task(name)], tower_state=state, image_size=clip.image_size)[name]

    def chosen_on_val(merge, lambdas):
        # λ is chosen on clean val accuracy alone: no triggered views needed
        scores = {lam: _average(evaluate(classifier, tasks, tower_state=merge(lam), split="val", image_size=clip.image_size))
                  for lam in lambdas}
        lam = max(scores, key=scores.get)
        return {"lambda": lam, "val_accuracy": scores, **run(merge(lam))}

    results: dict = {"real_clip_reference": REAL_CLIP, "tasks": names,
                     "chance": {t.name: 1 / t.num_classes for t in tasks}}
    results["zero_shot"] = run(base)
    results["experts"] = {n: own_task(e.encoder, n) for n, e in clean.items()}
    results["backdoored_experts"] = {}
    for n, e in backdoored.items():
        measured = run(e.encoder)
        results["backdoored_experts"][n] = {"accuracy": measured["test"][n]["accuracy"], **measured["backdoors"][n]}
    pools = {"clean": [clean[n].encoder for n in names],
             "default": [(backdoored.get(n) or clean[n]).encoder for n in names]}
    results["diagnostics"] = diagnostics(base, pools["clean"], names, run, results["zero_shot"]["test"])
    for pool, experts in pools.items():
        results[f"task_arithmetic_{pool}"] = chosen_on_val(lambda lam: task_arithmetic(base, experts, lam), TA_LAMBDAS)
        results[f"ties_{pool}"] = chosen_on_val(lambda lam: ties_merging(base, experts, 0.2, lam), TIES_LAMBDAS)
    if args.seeds:
        shipped = (MINI_WEIGHTS, MINI_RECIPE["lr"], MINI_RECIPE["max_steps"], MINI_RECIPE["tuned_blocks"])
        if (args.weights, args.lr, args.steps, args.tuned_blocks) != shipped:
            parser.error("AdaMerging runs the shipped config (the default pool and recipe): pass --seeds alone")
        results["adamerging_default"] = adamerging(args.seeds, output)
    results["expert_finetune_seconds"] = timings
    results["runtime_s"] = time.time() - start
    write_json(output / "results.json", results)
    print(tables(results))


def print_tables(path: str) -> None:
    """``python scripts/mini_benchmark.py --tables results.json``: the tables of a finished run."""
    print(tables(json.loads(Path(path).read_text())))


def _average(per_task: dict) -> float:
    return sum(r["accuracy"] for r in per_task.values()) / len(per_task)


def diagnostics(base, experts, names, run, zero_shot) -> dict:
    """Task-vector norms (relative to the base's), pairwise cosines, each expert alone at λ."""
    vectors = task_vectors(base, experts)
    flat = [torch.cat([v.flatten().float() for v in tv.values()]) for tv in vectors]
    base_norm = torch.cat([base[k].flatten().float() for k in vectors[0]]).norm()
    cosine = [[float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for b in flat] for a in flat]
    single = {}
    for name, expert in zip(names, experts):
        merged = run(task_arithmetic(base, [expert], SINGLE_LAMBDA))["test"]
        others = [merged[n]["accuracy"] - zero_shot[n]["accuracy"] for n in names if n != name]
        single[name] = {"own_gain": merged[name]["accuracy"] - zero_shot[name]["accuracy"],
                        "others_mean_change": sum(others) / len(others), "others_worst_change": min(others)}
    return {"relative_norm": {n: float(f.norm() / base_norm) for n, f in zip(names, flat)},
            "cosine": cosine, "single_expert_lambda": SINGLE_LAMBDA, "single_expert": single}


def adamerging(seeds: list[int], output: Path) -> dict:
    """Layer-wise AdaMerging as shipped (configs/merge/adamerging.yaml), one run per seed."""
    reports = []
    for seed in seeds:
        directory = output / "adamerging" / f"seed{seed}"
        if not (directory / "report.json").is_file():
            configs = [REPO / "configs/merge/base.yaml", REPO / "configs/merge/adamerging.yaml"]
            run_command(merge_command(configs, seed, directory), dry_run=False, label=f"adamerging seed {seed}")
        reports.append(read_report(directory))
    tasks = list(reports[0]["tasks"])
    mean = {t: {key: mean_known([r["tasks"][t].get(key) for r in reports]) for key in ("accuracy", "asr", "target_rate")}
            for t in tasks}
    return {"seeds": seeds, "test": mean, "runtime_s": [r["runtime_s"] for r in reports]}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def phenomena(results: dict) -> str:
    """The phenomena side by side with real CLIP ViT-B/32 on the 8-task benchmark."""
    real = results["real_clip_reference"]
    zero_shot = _average(results["zero_shot"]["test"])
    experts = _average(results["experts"])
    ta = results["task_arithmetic_default"]
    ta_acc = _average(ta["test"])
    ta_norm = sum(ta["test"][n]["accuracy"] / results["experts"][n]["accuracy"] for n in results["tasks"]) / len(results["tasks"])
    ada = results.get("adamerging_default")
    ada_acc = _average(ada["test"]) if ada else None
    bad = [s for s, e in results["backdoored_experts"].items() if "feature_interpolation" in str(MINI_BACKDOORS.get(s))]
    ta_asr = ", ".join(f"{s} → {ta['backdoors'][s]['target_task']}: {_pct(ta['backdoors'][s]['asr'])} "
                       f"({_pct(ta['backdoors'][s]['target_rate'])})" for s in bad)
    rows = [
        ("zero-shot → experts (avg ACC)", f"{_pct(real['zero_shot_acc'])} → {_pct(real['experts_acc'])}", f"{_pct(zero_shot)} → {_pct(experts)}"),
        (f"task arithmetic (λ {ta['lambda']} on val): avg ACC, normalized", f"{_pct(real['ta_acc'])}, {_pct(real['ta_normalized'])}",
         f"{_pct(ta_acc)}, {_pct(ta_norm)}"),
        ("layer-wise AdaMerging − task arithmetic", f"+{_pct(real['adamerging_minus_ta'])}",
         "—" if ada_acc is None else f"{100 * (ada_acc - ta_acc):+.1f}"),
        ("BadMerging experts' ASR in the TA merge (untriggered)", f"{real['badmerging_ta_asr']}", ta_asr or "—"),
    ]
    return "\n".join(["| | real CLIP ViT-B/32 | mini v2 |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows])


def tables(results: dict) -> str:
    names = results["tasks"]
    pct = _pct
    lines = [phenomena(results), "", "| | " + " | ".join(names) + " | avg ACC |", "|---" * (len(names) + 2) + "|"]

    def row(label, per_task):
        values = [per_task.get(n, {}).get("accuracy") for n in names]
        known = [v for v in values if v is not None]
        if not known:
            return
        lines.append(f"| {label} | " + " | ".join(pct(v) for v in values) + f" | {pct(sum(known) / len(known))} |")

    lines.append("| chance | " + " | ".join(pct(results["chance"][n]) for n in names) + " | |")
    row("zero-shot", results["zero_shot"]["test"])
    row("clean experts", results["experts"])
    row("backdoored experts", results["backdoored_experts"])
    for key, label in (("task_arithmetic_clean", "TA, all-clean pool"), ("task_arithmetic_default", "TA, default pool"),
                       ("ties_clean", "TIES, all-clean pool"), ("ties_default", "TIES, default pool")):
        row(f"{label} (λ {results[key]['lambda']})", results[key]["test"])
    ada = results.get("adamerging_default", {}).get("test", {})
    if ada:
        row(f"layer-wise AdaMerging, default pool ({len(results['adamerging_default']['seeds'])} seeds)", ada)

    lines += ["", "| backdoor (expert → target task) | alone | TA default | TIES default | AdaMerging default | "
              "TA all-clean | zero-shot |", "|---|---|---|---|---|---|---|"]
    for source, attack in MINI_BACKDOORS.items():
        if source not in results["backdoored_experts"]:
            continue
        alone = results["backdoored_experts"][source]
        target = alone["target_task"]

        def cell(entry):
            return f"{pct(entry['asr'])} ({pct(entry['target_rate'])})"

        cells = [cell(alone)] + [cell(results[k]["backdoors"][source]) for k in ("task_arithmetic_default", "ties_default")]
        cells += [cell(ada[target]) if ada.get(target, {}).get("asr") is not None else "—"]
        cells += [cell(results["task_arithmetic_clean"]["backdoors"][source]), cell(results["zero_shot"]["backdoors"][source])]
        lines.append(f"| {attack['class_path'].rsplit('.', 1)[-1]} {source} → {target} | " + " | ".join(cells) + " |")
    lines.append("\nASR (untriggered target rate) in %.")

    diag = results["diagnostics"]
    lines += ["", f"| expert | ‖τ‖/‖θ0‖ | own gain at λ {diag['single_expert_lambda']} | others' mean change | "
              "others' worst | max cosine to another τ |", "|---|---|---|---|---|---|"]
    for i, n in enumerate(names):
        s = diag["single_expert"][n]
        cos = max(c for j, c in enumerate(diag["cosine"][i]) if j != i)
        lines.append(f"| {n} | {diag['relative_norm'][n]:.3f} | {pct(s['own_gain'])} | {pct(s['others_mean_change'])} | "
                     f"{pct(s['others_worst_change'])} | {cos:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
