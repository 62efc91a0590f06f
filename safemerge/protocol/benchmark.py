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
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from safemerge.data import get_task
from safemerge.data.mini_v2 import domain_task_names
from safemerge.evaluation import classifier_for, evaluate, evaluate_backdoors
from safemerge.experts import MINI_MODEL, MINI_RECIPE, MINI_WEIGHTS, ensure_expert, mini_pool
from safemerge.io import read_expert, write_json
from safemerge.merging import task_arithmetic, task_vectors, ties_merging
from safemerge.models import load_clip
from safemerge.pool import backdoors_of
from safemerge.protocol import exits_on_user_error
from safemerge.protocol.runs import CONFIGS, merge_command
from safemerge.protocol.runs import run as run_command
from safemerge.protocol.tables import average_accuracy, benchmark_tables
from safemerge.report import mean_known, read_report

TA_LAMBDAS = (
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    1.0,
)  # task arithmetic's scaling, chosen on val as the literature does
TIES_LAMBDAS = (0.3, 0.5, 0.7, 1.0)
SINGLE_LAMBDA = 0.3  # each expert added alone at this scaling (the diagnostics)
# Real CLIP ViT-B/32, 8 tasks: AdaMerging paper (ACC) and BadMerging (ASR of its experts in a TA merge).
REAL_CLIP = {
    "zero_shot_acc": 0.483,
    "experts_acc": 0.905,
    "ta_acc": 0.691,
    "ta_normalized": 0.76,
    "adamerging_acc": 0.801,
    "adamerging_minus_ta": 0.110,
    "badmerging_ta_asr": "> 90",
}


def _arguments(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="AdaMerging seeds (none: skip it)")
    parser.add_argument("--output", default="outputs/mini_benchmark")
    parser.add_argument(
        "--weights", default=MINI_WEIGHTS, help="base weights: a pretrained tag or file (recipe search)"
    )
    parser.add_argument("--lr", type=float, default=MINI_RECIPE["lr"], help="expert learning rate (recipe search)")
    parser.add_argument("--steps", type=int, default=MINI_RECIPE["max_steps"], help="expert steps (recipe search)")
    parser.add_argument(
        "--tuned-blocks",
        type=int,
        default=MINI_RECIPE["tuned_blocks"],
        help="tune only the last N blocks (recipe search; -1: every block)",
    )
    parser.add_argument("--clean-only", action="store_true", help="skip the backdoored experts (recipe search)")
    parser.add_argument("--tables", metavar="RESULTS_JSON", help="only print the tables of a finished run")
    return parser, parser.parse_args(argv)


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser, args = _arguments(argv)
    if args.tables:
        return print(benchmark_tables(json.loads(Path(args.tables).read_text())))
    output = Path(args.output)
    start = time.time()
    recipe = {
        "pretrained": args.weights,
        "lr": args.lr,
        "max_steps": args.steps,
        "warmup_steps": min(MINI_RECIPE["warmup_steps"], args.steps // 5),
        "tuned_blocks": None if args.tuned_blocks == -1 else args.tuned_blocks,
    }
    clean, backdoored, timings = _experts(recipe, backdoored=not args.clean_only)
    results = measure(load_clip(MINI_MODEL, args.weights), clean, backdoored)
    if args.seeds:
        shipped = (MINI_WEIGHTS, MINI_RECIPE["lr"], MINI_RECIPE["max_steps"], MINI_RECIPE["tuned_blocks"])
        if (args.weights, args.lr, args.steps, args.tuned_blocks) != shipped:
            parser.error("AdaMerging runs the shipped config (the default pool and recipe): pass --seeds alone")
        results["adamerging_default"] = adamerging(args.seeds, output)
    results["expert_finetune_seconds"] = timings
    results["runtime_s"] = time.time() - start
    write_json(output / "results.json", results)
    print(benchmark_tables(results))


def _experts(recipe: dict, backdoored: bool) -> tuple[dict, dict, dict]:
    """The default pool's clean experts and backdoored ones by task, and the seconds each took."""
    timings, clean, poisoned = {}, {}, {}
    for clean_spec, poisoned_spec in zip(mini_pool(False, **recipe), mini_pool(backdoored, **recipe)):
        t0 = time.time()
        clean[clean_spec.task] = read_expert(ensure_expert(clean_spec))
        timings[clean_spec.task] = time.time() - t0
        if poisoned_spec.attack is not None:
            t0 = time.time()
            poisoned[poisoned_spec.task] = read_expert(ensure_expert(poisoned_spec))
            timings[f"{poisoned_spec.task}:backdoored"] = time.time() - t0
    return clean, poisoned, timings


def measure(clip, clean: dict, backdoored: dict) -> dict:
    """Zero-shot, experts, TA and TIES (λ on val) on the default and all-clean pools, diagnostics."""
    names = domain_task_names()
    tasks = [get_task(name) for name in names]
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    classifier = classifier_for(clip, tasks)
    backdoors, _ = backdoors_of(list(backdoored.items()), names)
    sources = list(backdoored)  # backdoors_of keeps the pool's order and skips none here (every target is merged)

    def run(state):
        """Per task ACC, ASR and untriggered target rate, and every backdoor's own pair, in one pass."""
        per_task, rates = evaluate_backdoors(
            classifier, tasks, backdoors, tower_state=state, image_size=clip.image_size
        )
        per_backdoor = {source: {"target_task": b.target_task, **r} for source, b, r in zip(sources, backdoors, rates)}
        return {"test": per_task, "backdoors": per_backdoor}

    def chosen_on_val(merge: Callable, lambdas: Sequence[float]) -> dict:
        # λ is chosen on clean val accuracy alone: no triggered views needed
        scores = {
            lam: average_accuracy(
                evaluate(classifier, tasks, tower_state=merge(lam), split="val", image_size=clip.image_size)
            )
            for lam in lambdas
        }
        lam = max(scores, key=scores.get)
        return {"lambda": lam, "val_accuracy": scores, **run(merge(lam))}

    results: dict = {
        "real_clip_reference": REAL_CLIP,
        "tasks": names,
        "chance": {t.name: 1 / t.num_classes for t in tasks},
    }
    results["zero_shot"] = run(base)
    results["experts"] = {
        n: evaluate(classifier, [get_task(n)], tower_state=e.encoder, image_size=clip.image_size)[n]
        for n, e in clean.items()
    }
    results["backdoored_experts"] = {}
    for n, e in backdoored.items():
        measured = run(e.encoder)
        results["backdoored_experts"][n] = {"accuracy": measured["test"][n]["accuracy"], **measured["backdoors"][n]}
    pools = {
        "clean": [clean[n].encoder for n in names],
        "default": [(backdoored.get(n) or clean[n]).encoder for n in names],
    }
    results["diagnostics"] = diagnostics(base, pools["clean"], names, run, results["zero_shot"]["test"])
    for pool, experts in pools.items():
        results[f"task_arithmetic_{pool}"] = chosen_on_val(lambda lam: task_arithmetic(base, experts, lam), TA_LAMBDAS)
        results[f"ties_{pool}"] = chosen_on_val(lambda lam: ties_merging(base, experts, 0.2, lam), TIES_LAMBDAS)
    return results


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
        single[name] = {
            "own_gain": merged[name]["accuracy"] - zero_shot[name]["accuracy"],
            "others_mean_change": sum(others) / len(others),
            "others_worst_change": min(others),
        }
    return {
        "relative_norm": {n: float(f.norm() / base_norm) for n, f in zip(names, flat)},
        "cosine": cosine,
        "single_expert_lambda": SINGLE_LAMBDA,
        "single_expert": single,
    }


def adamerging(seeds: Sequence[int], output: Path) -> dict:
    """Layer-wise AdaMerging as shipped (configs/merge/adamerging.yaml), one run per seed."""
    reports = []
    for seed in seeds:
        directory = output / "adamerging" / f"seed{seed}"
        if not (directory / "report.json").is_file():
            configs = [CONFIGS / "merge/base.yaml", CONFIGS / "merge/adamerging.yaml"]
            run_command(merge_command(configs, seed, directory), dry_run=False, label=f"adamerging seed {seed}")
        reports.append(read_report(directory))
    tasks = list(reports[0]["tasks"])
    mean = {
        t: {key: mean_known([r["tasks"][t].get(key) for r in reports]) for key in ("accuracy", "asr", "target_rate")}
        for t in tasks
    }
    return {"seeds": list(seeds), "test": mean, "runtime_s": [r["runtime_s"] for r in reports]}


if __name__ == "__main__":
    main()
