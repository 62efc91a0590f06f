"""The all-clean reference of a pool's triggers: what a merge with no backdoored expert scores.

    python scripts/all_clean_reference.py --pools mini_default mini_heldout_blended ... [--lambdas 0.3 0.4]

For each ``configs/pools/<name>.yaml``, every backdoored mini expert (``mini:<task>:<variant>``)
is replaced by its clean twin (``mini:<task>``) and the clean pool is merged by task
arithmetic at each λ. The merge is evaluated on the test splits with the *pool's* triggers and
targets: accuracy, and per backdoor its ASR beside its untriggered target rate (the share of
the same clean images already classified as the target). An ASR this merge reaches is what a
trigger does without any backdoor (a universal adversarial patch, a class the merge already
favours), so it is the floor a defence can be asked to reach. The averages are computed as in
``report.json`` (mean over the tasks a backdoor targets). ``--merged LABEL=DIR`` also measures
a merge of the all-clean pool made by another method (its run's ``merged/`` directory): that
method's own floor. Writes ``<output>`` (JSON) and prints a
table; experts come from the cache (fine-tuned on first use).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from safemerge.data import get_task
from safemerge.errors import ConfigError
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


def reference_for(
    name: str, lambdas: Sequence[float], clip, base, pools: Path = POOLS, merged: Mapping[str, Path] | None = None
) -> dict:
    """The pool's triggers on the task-arithmetic merge of its clean twins, at each λ, and on
    each already merged tower of ``merged`` (label → a merge's ``merged/`` directory, made from
    the all-clean pool by any method: that method's own all-clean reference)."""
    references = backdoored_mini_pool(name, pools)
    pool = [(r, read_expert(resolve_expert(r))) for r in references]
    clean = [read_expert(resolve_expert(clean_twin(r))) for r in references]
    tasks = [get_task(e.task) for _, e in pool]
    backdoors, found = backdoors_of(pool, [t.name for t in tasks])
    classifier = classifier_for(clip, tasks)

    def measured(tower_state) -> dict:
        per_task, per_backdoor = evaluate_backdoors(
            classifier, tasks, backdoors, tower_state=tower_state, image_size=clip.image_size
        )
        average = {key: mean_known([t[key] for t in per_task.values()]) for key in ("accuracy", "asr", "target_rate")}
        return {"average": average, "backdoors": per_backdoor, "tasks": per_task}

    result = {
        "experts": references,
        "clean_experts": [clean_twin(r) for r in references],
        "backdoors": [{key: b[key] for key in ("expert", "target_task", "target_class")} for b in found],
        "task_arithmetic": {
            str(lam): measured(task_arithmetic(base, [e.encoder for e in clean], lam)) for lam in lambdas
        },
    }
    if merged:
        result["merged"] = {label: measured(merged_tower(d, [t.name for t in tasks])) for label, d in merged.items()}
    return result


def merged_tower(directory: Path, tasks: Sequence[str]) -> dict:
    """The tower of a merge's ``merged/`` directory, which must have merged exactly ``tasks``."""
    expert = read_expert(directory)
    merged_tasks = expert.info.get("tasks") or expert.task.split("+")
    if list(merged_tasks) != list(tasks):
        raise ConfigError(
            f"--merged {directory}: it merged the tasks {', '.join(merged_tasks)}, not the pool's "
            f"{', '.join(tasks)}: merge the all-clean pool (configs/pools/mini_clean.yaml) with the method"
        )
    return expert.encoder


def merged_directories(values: Sequence[str]) -> dict[str, Path]:
    """``LABEL=DIR`` arguments as a mapping (a one-line error on any other shape)."""
    result = {}
    for value in values:
        label, sep, directory = value.partition("=")
        if not sep or not label or not directory:
            raise ConfigError(f"--merged takes LABEL=DIR (a merge's merged/ directory), got {value!r}")
        result[label] = Path(directory).expanduser()
    return result


@exits_on_user_error
def main(argv: Sequence[str] | None = None, pools: Path = POOLS) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", required=True, help="configs/pools names (mini pools)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3], help="task arithmetic's scaling")
    parser.add_argument("--output", default="outputs/all_clean_reference.json")
    parser.add_argument(
        "--merged",
        nargs="+",
        default=[],
        metavar="LABEL=DIR",
        help="also measure these merges of the all-clean pool (a run's merged/ directory): a method's own reference",
    )
    args = parser.parse_args(argv)
    merged = merged_directories(args.merged)
    for name in args.pools:
        backdoored_mini_pool(name, pools)  # every name checked before anything is fine-tuned
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}  # each merge is loaded into the tower
    results = {name: reference_for(name, args.lambdas, clip, base, pools, merged) for name in args.pools}
    write_json(Path(args.output), results)
    print(reference_table(results))


if __name__ == "__main__":
    main()
