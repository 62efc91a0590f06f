"""Measure the mini benchmark: zero-shot, experts, task arithmetic, backdoor succession.

    python scripts/mini_benchmark.py [--steps 600] [--lr 1e-4]

Experts come from the cache (fine-tuned on first use). Prints a markdown table and writes
``outputs/mini_benchmark/results.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safemerge.attacks import Trigger  # noqa: E402
from safemerge.data import get_task  # noqa: E402
from safemerge.data.mini import mini_task_names  # noqa: E402
from safemerge.evaluation import Backdoor, classifier_for, evaluate  # noqa: E402
from safemerge.experts import MINI_MODEL, MINI_RECIPE, MINI_WEIGHTS, ensure_expert, mini_pool  # noqa: E402
from safemerge.io import read_expert, write_json  # noqa: E402
from safemerge.merging import task_arithmetic  # noqa: E402
from safemerge.models import load_clip  # noqa: E402

LAMBDAS = (0.2, 0.3, 0.5)  # the literature picks task arithmetic's scaling on validation data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=MINI_RECIPE["max_steps"])
    parser.add_argument("--lr", type=float, default=MINI_RECIPE["lr"])
    parser.add_argument("--output", default="outputs/mini_benchmark")
    args = parser.parse_args()

    start = time.time()
    tasks = [get_task(name) for name in mini_task_names()]
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}
    classifier = classifier_for(clip, tasks)

    recipe = {"lr": args.lr, "max_steps": args.steps, "warmup_steps": min(50, args.steps // 5)}
    timings, experts, backdoored = {}, {}, {}
    for clean, poisoned in zip(mini_pool(False, **recipe), mini_pool(True, **recipe)):
        t0 = time.time()
        experts[clean.task] = read_expert(ensure_expert(clean))
        timings[clean.task] = time.time() - t0
        if poisoned.attack is not None:
            backdoored[poisoned.task] = read_expert(ensure_expert(poisoned))
    backdoors = [
        Backdoor(Trigger.from_tensors(e.trigger), e.backdoor["target_task"], e.backdoor["target_class"])
        for e in backdoored.values()
    ]

    def run(state, split="test"):
        return evaluate(classifier, tasks, backdoors, tower_state=state, split=split, image_size=clip.image_size)

    results = {"zero_shot": run(base)}
    results["experts"] = {n: run(e.encoder)[n] for n, e in experts.items()}
    results["backdoored_experts"] = {n: run(e.encoder)[n] for n, e in backdoored.items()}

    def best_task_arithmetic(pool):
        scores = {}
        for lam in LAMBDAS:
            val = run(task_arithmetic(base, [e.encoder for e in pool], lam), split="val")
            scores[lam] = sum(r["accuracy"] for r in val.values()) / len(val)
        lam = max(scores, key=scores.get)
        return lam, scores, run(task_arithmetic(base, [e.encoder for e in pool], lam))

    clean_pool = list(experts.values())
    poisoned_pool = [backdoored.get(n, e) for n, e in experts.items()]
    for label, pool in (("ta_clean_pool", clean_pool), ("ta_backdoored_pool", poisoned_pool)):
        lam, scores, test = best_task_arithmetic(pool)
        results[label] = {"lambda": lam, "val_avg_accuracy": scores, "test": test}
    results["expert_finetune_seconds"] = timings
    results["runtime_s"] = time.time() - start
    write_json(Path(args.output) / "results.json", results)
    print(table(results, [t.name for t in tasks]))


def table(results: dict, names: list[str]) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}"

    rows = ["| | " + " | ".join(names) + " | avg acc |", "|---" * (len(names) + 2) + "|"]

    def row(label, per_task, key="accuracy"):
        values = [per_task[n][key] if n in per_task else None for n in names]
        known = [v for v in values if v is not None]
        avg = sum(known) / len(known) if known and key == "accuracy" else None
        rows.append(f"| {label} | " + " | ".join(pct(v) for v in values) + f" | {pct(avg)} |")

    row("zero-shot ACC", results["zero_shot"])
    row("zero-shot ASR", results["zero_shot"], "asr")
    row("clean experts ACC", results["experts"])
    row("backdoored experts ACC", results["backdoored_experts"])
    row("backdoored experts ASR", results["backdoored_experts"], "asr")
    for label in ("ta_clean_pool", "ta_backdoored_pool"):
        lam = results[label]["lambda"]
        row(f"{label} (λ={lam}) ACC", results[label]["test"])
        row(f"{label} (λ={lam}) ASR", results[label]["test"], "asr")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
