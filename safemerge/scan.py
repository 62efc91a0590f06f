"""Pre-merge backdoor scan: rank a pool's experts by backdoor suspicion before merging them.

Label-free and trigger-free: the scan reads only the experts' weights and a few unlabeled
images of the pool's tasks (their ``val`` split, as a merge's adaptation does). It never reads
an expert's ``backdoor`` record, trigger or metrics: those are the truth the scan is measured
against (``scripts/scan_pools.py``), nothing else.

Method (Neural-Cleanse-style trigger inversion, chosen on the dev pool ``mini_default``; the
figures: ``scripts/scan_pools.py``). For every expert ``i`` and every pool task ``t`` — an
off-task backdoor lives on another task's head — the model ``θ_0 + τ_i`` with ``t``'s head gets
targeted triggers inverted on ``images`` unlabeled images of ``t``, one toward every class of
``t`` (Neural Cleanse's loop; ``targets="easiest"``: one, toward the class the images reach most
easily, :func:`easiest_target` — cheaper, but on the dev pool it aimed at other classes than the
backdoors'): a mask and a pattern over the whole image
(:class:`~safemerge.merging.simulated_triggers.PatchTrigger`, area penalty :data:`AREA_WEIGHT`).
Each is then cut to its ``budget`` strongest pixels (a binary mask, 2 % of the image) and
applied to ``images`` *other* images of ``t``: its flip rate is the share of them, not already
of its class, that it sends there; ``f_{i,t}`` is the best class's.
Universal adversarial patches flip clean models too, and how easily depends on the task and on
fine-tuning, so each expert is compared with its peers (Neural Cleanse's anomaly idea): its
score is its largest excess over the pool's median flip rate, ``max_t (f_{i,t} − median_j
f_{j,t})`` (the lower median for an even pool). A backdoor is a shortcut that a few pixels open,
so a backdoored expert's excess is large on its target task where its peers' is not. The pool
needs at least 3 experts for the median to mean "the typical expert".

Public names, stable:

- ``scan_experts(paths, *, threshold, images, seed, steps, budget) -> dict``: the scan's JSON
  object (below); ``paths`` are expert directories or ``mini:`` references.
- ``scan_models(tower, experts, tasks, heads, images, ...) -> list[dict]``: the method on models
  in memory (the tests' toy towers use it): one evidence record per expert.
- ``main(argv)``: ``python -m safemerge.scan --experts DIR [DIR ...] --output scan.json
  [--threshold T] [--images N] [--seed S] [--targets every|easiest]``.

The JSON (``write_json``, atomic)::

    {"format": "safemerge-scan/1", "threshold": T, "method": "...",
     "experts": [{"path", "task", "score", "flagged", "evidence": {...}}, ...]}   # by score, highest first

``score``: the expert's largest flip-rate excess over the pool's median (in [-1, 1]; higher:
more suspicious). ``flagged``: ``score > threshold``. ``evidence``: ``target_task`` and
``target_class`` (where the largest excess is: the suspected backdoor's target), ``flip_rate``
(the expert's flip rate there) and ``pool_flip_rate`` (the pool's median there), ``area`` (the
inverted trigger's pixels, as a fraction of the image), ``flip_rates`` (the expert's flip rate
on every pool task).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from safemerge.errors import ConfigError, SafemergeError
from safemerge.merging.simulated_triggers import PatchTrigger
from safemerge.seeding import seeded_generator

SCAN_FORMAT = "safemerge-scan/1"
METHOD = "trigger inversion: max over tasks of the flip-rate excess over the pool median"
# Chosen on the dev pool (mini_default): between its highest clean score (0.42) and its lowest backdoored one (0.50).
DEFAULT_THRESHOLD = 0.45
DEFAULT_IMAGES = 8
DEFAULT_STEPS = 15
DEFAULT_BUDGET = 0.02  # the inverted trigger's hard mask: this fraction of the image's pixels
# "every": a trigger toward every class of a task (Neural Cleanse's loop; x classes the cost);
# "easiest": one toward the class the images reach most easily.
DEFAULT_TARGETS = "every"
AREA_WEIGHT = 1.0  # mean(mask) costs up to 1, a cross-entropy's order: the mask grows only where it pays
LEARNING_RATE = 0.1


def scan_experts(
    paths: Sequence[str],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    images: int = DEFAULT_IMAGES,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    budget: float = DEFAULT_BUDGET,
    targets: str = DEFAULT_TARGETS,
    accelerator: str = "cpu",
    memo: dict | None = None,
) -> dict:
    """Scan expert directories (or ``mini:`` references) and return the scan's JSON object.

    Loads the experts' common pretrained model and the zero-shot head of every pool task (an
    expert's own ``head.safetensors`` where it has one), draws ``images`` unlabeled images per
    task from the ``val`` split (seeded by ``seed``) and ranks the experts with
    :func:`scan_models`. Bad input (no experts, a missing or invalid expert directory, experts
    of different pretrained models, two experts of one task) raises a one-line
    :class:`~safemerge.errors.SafemergeError`. A merge can call this first and refuse or report
    the flagged experts.
    """
    from safemerge.data.registry import get_task
    from safemerge.evaluation import classifier_for
    from safemerge.experts import resolve_experts
    from safemerge.models import load_clip
    from safemerge.pool import check_pool, read_pool

    _check_settings(threshold, images, steps, budget)
    if targets not in ("every", "easiest"):
        raise ConfigError(f"targets must be every or easiest, got {targets!r}")
    if not paths:
        raise ConfigError("no experts to scan: give expert directories (or mini:<task> references) to --experts")
    # Only mini: references are resolved: resolving a directory would log its expert.json's backdoor record.
    directories = [resolve_experts([p], accelerator)[0] if str(p).startswith("mini:") else str(p) for p in paths]
    pool = read_pool(directories)
    clip = load_clip(pool.model, pool.pretrained)
    check_pool(pool, clip.visual.state_dict())
    tasks = [get_task(t) for t in pool.tasks]
    classifier = classifier_for(clip, tasks, {e.task: e.head for _, e in pool.experts if e.head is not None})
    heads = {t: classifier.head(t) for t in pool.tasks}
    data = {task.name: task_images(task, 2 * images, seed, clip.image_size) for task in tasks}
    records = scan_models(
        classifier.tower,
        pool.encoders,
        pool.tasks,
        heads,
        data,
        mean=clip.mean,
        std=clip.std,
        steps=steps,
        budget=budget,
        seed=seed,
        targets=targets,
        keys=directories,
        memo=memo,
    )
    experts = [{"path": str(path), "task": task, **record} for path, task, record in zip(paths, pool.tasks, records)]
    return scan_document(experts, threshold)


def scan_document(experts: list[dict], threshold: float) -> dict:
    """The scan's JSON object: experts by score (highest first), flagged above ``threshold``."""
    ranked = sorted(experts, key=lambda e: -e["score"])
    for expert in ranked:
        expert["flagged"] = bool(expert["score"] > threshold)
    return {"format": SCAN_FORMAT, "method": METHOD, "threshold": threshold, "experts": ranked}


def task_images(task, count: int, seed: int, image_size: int, split: str = "val") -> Tensor:
    """``count`` unlabeled images of ``task``'s ``split`` in a seeded order (labels dropped)."""
    from safemerge.data.datamodule import build_split

    dataset = build_split(task, split, root=None, image_size=image_size, download=False, seed=0)
    if len(dataset) < 2:
        raise ConfigError(f"task {task.name}'s {split} split has {len(dataset)} images; the scan needs at least 2")
    order = torch.randperm(len(dataset), generator=seeded_generator(seed, f"scan:{task.name}"))[:count]
    return torch.stack([dataset[int(i)][0] for i in order])


def scan_models(
    tower: nn.Module,
    experts: Sequence[Mapping[str, Tensor]],
    tasks: Sequence[str],
    heads: Mapping[str, Tensor],
    images: Mapping[str, Tensor],
    *,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    steps: int = DEFAULT_STEPS,
    budget: float = DEFAULT_BUDGET,
    seed: int = 0,
    targets: str = DEFAULT_TARGETS,
    keys: Sequence[str] | None = None,
    memo: dict | None = None,
) -> list[dict]:
    """One ``{"score", "evidence"}`` record per expert, in order (see the module docstring).

    ``tower`` is the pretrained image tower θ_0 (its weights are not changed), ``experts`` the
    experts' state dicts of it, ``tasks`` every expert's task, ``heads`` a ``[classes, dim]``
    head per pool task (logit scale included), ``images`` the unlabeled images of every pool
    task (``[N, 3, H, W]`` in [0, 1]): the first half is where triggers are inverted, the second
    where their flip rates are measured. ``memo`` (with ``keys``, one per expert) keeps every
    expert's inversions across calls: a script scanning pools that share experts inverts each once.
    """
    tower = tower.eval().requires_grad_(False)
    names = list(tower.state_dict())
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pool_tasks = list(dict.fromkeys(tasks))
    memo = {} if memo is None else memo
    keys = list(keys) if keys is not None else [None] * len(experts)

    rows = []
    for key, state in zip(keys, experts):
        weights = {k: state[k] for k in names}
        cached = memo.get(key, {}) if key is not None else {}
        row = {}
        for t in pool_tasks:
            if t in cached:
                row[t] = cached[t]
                continue
            goals = [None] if targets == "easiest" else range(len(heads[t]))
            found = [
                invert_trigger(tower, weights, heads[t], images[t], mean_t, std_t, steps, budget, seed, t, goal)
                for goal in goals
            ]
            row[t] = max(found, key=lambda f: f["flip_rate"])  # the class the trigger reaches best
        if key is not None:
            memo[key] = {**cached, **row}
        rows.append(row)
    # The pool's typical flip rate per task: universal patches flip clean models too, and how
    # easily depends on the task and on fine-tuning, so each expert is compared with its peers.
    typical = {t: float(torch.tensor([row[t]["flip_rate"] for row in rows]).median()) for t in pool_tasks}
    records = []
    for row in rows:
        excess = {t: row[t]["flip_rate"] - typical[t] for t in pool_tasks}
        target = max(pool_tasks, key=lambda t: excess[t])
        records.append(
            {
                "score": round(excess[target], 6),
                "evidence": {
                    "target_task": target,
                    "target_class": row[target]["target_class"],
                    "flip_rate": row[target]["flip_rate"],
                    "pool_flip_rate": typical[target],
                    "area": row[target]["area"],
                    "flip_rates": {t: row[t]["flip_rate"] for t in pool_tasks},
                },
            }
        )
    return records


def invert_trigger(
    tower: nn.Module,
    weights: Mapping[str, Tensor],
    head: Tensor,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    steps: int,
    budget: float,
    seed: int,
    task: str,
    target: int | None = None,
) -> dict:
    """Invert a targeted trigger for one model and task; its flip rate on held-out images.

    The soft mask and pattern are fit on the first half of ``images``, toward ``target`` (None:
    the class the triggered images reach most easily, :func:`easiest_target`); the trigger is then cut to its ``budget`` strongest mask
    pixels (a binary mask) and the flip rate measured on the second half: the share of images
    not already predicted as the target class that the trigger sends there.
    """
    half = max(1, len(images) // 2)
    fit, held_out = images[:half], images[half:] if len(images) > half else images[:half]
    size = images.shape[-1]

    def logits(x: Tensor) -> Tensor:
        features = F.normalize(functional_call(tower, dict(weights), ((x - mean) / std,)), dim=-1)
        return features.float() @ head.float().T

    trigger = PatchTrigger([task], size, area_weight=AREA_WEIGHT, targeted=True)
    with torch.no_grad():  # a random pattern start: a zero logit is a flat grey, the same for every model
        trigger.pattern_logits[0].normal_(0, 1, generator=seeded_generator(seed, f"pattern:{task}"))
    optimizer = torch.optim.Adam(trigger.parameters(), lr=LEARNING_RATE)
    with torch.no_grad():
        predicted = logits(fit).argmax(-1)
    for _ in range(steps):
        log_p = F.log_softmax(logits(trigger.apply(fit, task)), -1)
        goal = easiest_target(log_p.detach(), predicted) if target is None else target
        others = predicted != goal
        if not others.any():  # every image is already of the class: nothing to flip toward it
            break
        loss = -log_p[others, goal].mean() + trigger.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        soft = trigger.mask(task)
        pixels = max(1, round(budget * size * size))
        hard = torch.zeros_like(soft).flatten()
        hard[soft.flatten().topk(pixels).indices] = 1.0
        hard = hard.view_as(soft)
        if target is None:
            target = easiest_target(F.log_softmax(logits(trigger.apply(fit, task)), -1), predicted)
        clean = logits(held_out).argmax(-1)
        flipped = logits((1 - hard) * held_out + hard * trigger.pattern(task)).argmax(-1)
        keep = clean != target
        rate = float((flipped[keep] == target).float().mean()) if keep.any() else 0.0
    return {"flip_rate": round(rate, 6), "target_class": target, "area": round(pixels / (size * size), 6)}


def easiest_target(log_p: Tensor, predicted: Tensor) -> int:
    """The class the triggered images reach most easily: the lowest mean cross-entropy over the
    images whose clean prediction is another class (those already of a class cannot flip to it;
    a class no image is outside of is never the target)."""
    best, target = math.inf, 0
    for c in range(log_p.shape[1]):
        others = predicted != c
        if others.any():
            loss = float(-log_p[others, c].mean())
            if loss < best:
                best, target = loss, c
    return target


def _check_settings(threshold: float, images: int, steps: int, budget: float) -> None:
    if not math.isfinite(threshold):
        raise ConfigError(f"--threshold must be a finite number, got {threshold}")
    if images < 2:
        raise ConfigError(f"--images must be at least 2 (half invert the trigger, half measure it), got {images}")
    if steps < 1:
        raise ConfigError(f"the scan needs at least 1 inversion step, got {steps}")
    if not 0 < budget <= 1:
        raise ConfigError(f"the trigger budget is a fraction of the image in (0, 1], got {budget}")


def main(argv: Sequence[str] | None = None) -> int:
    from safemerge.io import write_json

    parser = argparse.ArgumentParser(prog="python -m safemerge.scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", nargs="+", required=True, help="expert directories or mini:<task>[:<variant>]")
    parser.add_argument("--output", required=True, help="the scan's JSON file (written atomically)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="flag scores above this")
    parser.add_argument(
        "--images", type=int, default=DEFAULT_IMAGES, help="unlabeled images per task (x2: fit, measure)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--targets", choices=("every", "easiest"), default=DEFAULT_TARGETS, help="classes a trigger is inverted toward"
    )
    args = parser.parse_args(argv)
    start = time.time()
    try:
        document = scan_experts(
            args.experts, threshold=args.threshold, images=args.images, seed=args.seed, targets=args.targets
        )
        write_json(Path(args.output), document)
    except SafemergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flagged = [e["path"] for e in document["experts"] if e["flagged"]]
    print(f"scanned {len(document['experts'])} experts in {time.time() - start:.0f} s; flagged: {flagged or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
