"""The all-clean reference of a pool's triggers: what a merge with no backdoored expert scores.

    python scripts/all_clean_reference.py --pools mini_default mini_heldout_blended ... [--lambdas 0.3 0.4]

For each ``configs/pools/<name>.yaml``, every backdoored mini expert (``mini:<task>:<variant>``)
is replaced by its clean twin (``mini:<task>``) and the clean pool is merged by task
arithmetic at each λ. The merge is evaluated on the test splits with the *pool's* triggers and
targets: accuracy, and per backdoor its ASR beside its untriggered target rate (the share of
the same clean images already classified as the target). An ASR this merge reaches is what a
trigger does without any backdoor (a universal adversarial patch, a class the merge already
favours), so it is the floor a defence can be asked to reach. The averages are computed as in
``report.json`` (mean over the tasks a backdoor targets). Writes ``<output>`` (JSON) and prints a
table; experts come from the cache (fine-tuned on first use).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from safemerge.data import get_task
from safemerge.evaluation import classifier_for, evaluate_backdoors
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, resolve_expert
from safemerge.io import read_expert, write_json
from safemerge.merging import task_arithmetic
from safemerge.models import load_clip
from safemerge.pool import backdoors_of
from safemerge.protocol import exits_on_user_error
from safemerge.protocol.pools import POOLS, backdoored_mini_pool, clean_twin
from safemerge.protocol.tables import reference_table
from safemerge.report import mean_known


def reference_for(name: str, lambdas: Sequence[float], clip, base, pools: Path = POOLS) -> dict:
    """The pool's triggers on the task-arithmetic merge of its clean twins, at each λ."""
    references = backdoored_mini_pool(name, pools)
    pool = [(r, read_expert(resolve_expert(r))) for r in references]
    clean = [read_expert(resolve_expert(clean_twin(r))) for r in references]
    tasks = [get_task(e.task) for _, e in pool]
    backdoors, found = backdoors_of(pool, [t.name for t in tasks])
    classifier = classifier_for(clip, tasks)
    result = {
        "experts": references,
        "clean_experts": [clean_twin(r) for r in references],
        "backdoors": [{key: b[key] for key in ("expert", "target_task", "target_class")} for b in found],
        "task_arithmetic": {},
    }
    for lam in lambdas:
        per_task, per_backdoor = evaluate_backdoors(
            classifier,
            tasks,
            backdoors,
            tower_state=task_arithmetic(base, [e.encoder for e in clean], lam),
            image_size=clip.image_size,
        )
        result["task_arithmetic"][str(lam)] = {
            "average": {
                key: mean_known([t[key] for t in per_task.values()]) for key in ("accuracy", "asr", "target_rate")
            },
            "backdoors": per_backdoor,
            "tasks": per_task,
        }
    return result


@exits_on_user_error
def main(argv: Sequence[str] | None = None, pools: Path = POOLS) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", required=True, help="configs/pools names (mini pools)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3], help="task arithmetic's scaling")
    parser.add_argument("--output", default="outputs/all_clean_reference.json")
    args = parser.parse_args(argv)
    for name in args.pools:
        backdoored_mini_pool(name, pools)  # every name checked before anything is fine-tuned
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}  # each merge is loaded into the tower
    results = {name: reference_for(name, args.lambdas, clip, base, pools) for name in args.pools}
    write_json(Path(args.output), results)
    print(reference_table(results))


if __name__ == "__main__":
    main()
