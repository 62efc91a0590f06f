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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from safemerge.attacks import Trigger  # noqa: E402
from safemerge.data import get_task  # noqa: E402
from safemerge.evaluation import Backdoor, classifier_for, evaluate_backdoors  # noqa: E402
from safemerge.experts import MINI_MODEL, MINI_PREFIX, MINI_WEIGHTS, resolve_expert  # noqa: E402
from safemerge.io import read_expert, write_json  # noqa: E402
from safemerge.merging import task_arithmetic  # noqa: E402
from safemerge.models import load_clip  # noqa: E402
from safemerge.report import mean_known  # noqa: E402

POOLS = REPO / "configs" / "pools"


def pool_experts(name: str) -> list[str]:
    """The expert references of ``configs/pools/<name>.yaml``; only mini pools have clean twins."""
    path = POOLS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in POOLS.glob("*.yaml")))
        raise SystemExit(f"error: unknown pool {name!r}; pools (configs/pools): {known}")
    references = yaml.safe_load(path.read_text())["model"]["init_args"]["experts"]
    if not all(r.startswith(MINI_PREFIX) for r in references):
        raise SystemExit(f"error: pool {name!r} has experts outside the mini pool: no clean twin to build")
    if all(clean_twin(r) == r for r in references):
        raise SystemExit(f"error: pool {name!r} has no backdoored expert: there is no trigger to measure")
    return references


def clean_twin(reference: str) -> str:
    """``mini:<task>:<variant>`` → ``mini:<task>``."""
    return ":".join(reference.split(":")[:2])


def reference_for(name: str, lambdas: list[float], clip, base) -> dict:
    """The pool's triggers on the task-arithmetic merge of its clean twins, at each λ."""
    references = pool_experts(name)
    pool = [read_expert(resolve_expert(r)) for r in references]
    clean = [read_expert(resolve_expert(clean_twin(r))) for r in references]
    backdoored = [(r, e) for r, e in zip(references, pool) if e.backdoor]
    backdoors = [Backdoor(Trigger.from_tensors(e.trigger), e.backdoor.get("target_task") or e.task,
                          int(e.backdoor["target_class"])) for _, e in backdoored]
    tasks = [get_task(e.task) for e in pool]
    classifier = classifier_for(clip, tasks)
    result = {"experts": references, "clean_experts": [clean_twin(r) for r in references],
              "backdoors": [{"expert": r, "target_task": b.target_task, "target_class": b.target_class}
                            for (r, _), b in zip(backdoored, backdoors)],
              "task_arithmetic": {}}
    for lam in lambdas:
        per_task, per_backdoor = evaluate_backdoors(
            classifier, tasks, backdoors, tower_state=task_arithmetic(base, [e.encoder for e in clean], lam),
            image_size=clip.image_size)
        result["task_arithmetic"][str(lam)] = {
            "average": {key: mean_known([t[key] for t in per_task.values()]) for key in ("accuracy", "asr", "target_rate")},
            "backdoors": per_backdoor, "tasks": per_task}
    return result


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table(results: dict) -> str:
    lines = ["| pool | λ | ACC | ASR (untriggered) | per backdoor: ASR (untriggered) |", "|---|---|---|---|---|"]
    for pool, result in results.items():
        for lam, merged in result["task_arithmetic"].items():
            average = merged["average"]
            each = ", ".join(f"{b['expert']}: {_pct(r['asr'])} ({_pct(r['target_rate'])})"
                             for b, r in zip(result["backdoors"], merged["backdoors"]))
            lines.append(f"| {pool} | {lam} | {_pct(average['accuracy'])} | {_pct(average['asr'])} "
                         f"({_pct(average['target_rate'])}) | {each} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", required=True, help="configs/pools names (mini pools)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.3], help="task arithmetic's scaling")
    parser.add_argument("--output", default="outputs/all_clean_reference.json")
    args = parser.parse_args(argv)
    for name in args.pools:
        pool_experts(name)  # every name checked before anything is fine-tuned
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    base = {k: v.clone() for k, v in clip.visual.state_dict().items()}  # each merge is loaded into the tower
    results = {name: reference_for(name, args.lambdas, clip, base) for name in args.pools}
    write_json(Path(args.output), results)
    print(table(results))


if __name__ == "__main__":
    main()
