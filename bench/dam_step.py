"""Benchmark 2: one full DAM training step (mask stage) of MergeLearner, for several T.

``DAMAdaMerging(granularity="layer")`` in its mask stage: inner λ step, perturbation step
(pseudo-labels without grad, then the perturbed forward), mask step (clean + perturbed in one
forward), each with its Adam update. One fresh process per T.

Besides the step time, the worker measures the merge's own share: the work a DAM step spends
building merged weights and back-propagating through that construction, outside the tower:

  sample   one mask sample (ConcreteMask.sample)
  inner    weights(λ, detached mask, rescale=True) + backward of sum(w * g) into λ
  pseudo   weights(λ, detached mask, rescale=True) under no_grad (reused for the perturbed forward)
  mask     weights(λ.detach(), mask, rescale=True) + backward of sum(w * g) into the mask logits
  adam     the mask optimizer's step over the mask logits (one logit per weight)

(g: fixed random tensors shaped as the weights, standing in for the tower's gradients.)

    python bench/dam_step.py                      # T = 2, 4, 6, 8
    python bench/dam_step.py --tasks 4 --steps 2
    python bench/dam_step.py --device cuda --bf16 --steps 10
    python bench/dam_step.py --src /path/to/other/checkout   # its safemerge instead of this repo's
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def worker(args) -> dict:

    from safemerge.merging import DAMAdaMerging
    from safemerge.merging.learner import MergeLearner
    from safemerge.merging.merged import MergedEncoder
    from safemerge.models.classifier import ImageClassifier

    common.setup_torch(args)
    memory = common.Memory(args.device)
    T, B, device = args.num_tasks, args.batch, args.device
    tower = common.make_tower(args.model, device)
    heads = common.make_heads(T, common.output_dim(tower, args.image_size), args.classes, args.seed, device)
    batch = common.make_images(T, B, args.seed, device, size=args.image_size)
    experts = [common.expert_state(tower, i, args.seed) for i in range(T)]
    encoder = MergedEncoder(tower, experts)
    del experts
    classifier = ImageClassifier(tower, heads, common.MEAN, common.STD).to(device)
    method = DAMAdaMerging(granularity="layer", steps=10**6)
    learner = MergeLearner(encoder, classifier, method, list(batch), image_size=args.image_size, seed=args.seed).to(
        device
    )
    optimizers = learner.make_optimizers()
    counter = iter(range(10**9))

    def step():
        with common.autocast(args):
            learner.training_step(next(counter), batch, optimizers)

    memory.setup_done()
    times = common.time_steps(step, args.warmup, args.steps, device)
    info = memory.steps_done()
    merge = merge_share(args, learner, optimizers) if not args.no_merge_share else {}
    result = {"tasks": T, "batch": B, **common.summarize(times), **info, "merge": merge}
    if merge:
        result["merge_share"] = merge["total_s"] / result["median_s"]
    return result


def merge_share(args, learner, optimizers) -> dict:
    """Median seconds of each merge-side phase of a DAM step (see the module docstring)."""
    import torch

    encoder, mask, coefficients = learner.encoder, learner.mask, learner.coefficients
    try:  # as MergeLearner forms the masked weights (one mask: product(m) is m)
        from safemerge.merging.masks import product

        def masked(lam, m):
            return encoder.weights(lam, product(m), rescale=True)
    except ImportError:  # a --src checkout from before the change (a658d87 and earlier)
        from safemerge.merging.masks import combine

        def masked(lam, m):
            return encoder.weights(lam, combine(m))

    device = args.device
    gen = torch.Generator(device).manual_seed(args.seed)
    grads = [torch.randn(shape, device=device) * 1e-3 for shape in encoder.shapes]

    def dummy_backward(weights, inputs):
        merged = [weights[n] for n in encoder.names]
        torch.autograd.grad(merged, inputs, grads)

    def timed(fn):
        common.synchronize(device)
        start = time.perf_counter()
        out = fn()
        common.synchronize(device)
        return time.perf_counter() - start, out

    phases = {"sample": [], "inner": [], "pseudo": [], "mask": [], "adam": []}
    for _ in range(args.merge_repeats):
        with common.autocast(args):
            t, sample = timed(lambda: mask.sample(gen))
            phases["sample"].append(t)
            fixed = [m.detach() for m in sample]
            phases["inner"].append(timed(lambda: dummy_backward(masked(coefficients, fixed), [coefficients]))[0])
            with torch.no_grad():
                phases["pseudo"].append(timed(lambda: masked(coefficients.detach(), fixed))[0])
            phases["mask"].append(
                timed(lambda: dummy_backward(masked(coefficients.detach(), sample), list(mask.parameters())))[0]
            )
        for p, g in zip(mask.parameters(), grads):
            p.grad = g
        phases["adam"].append(timed(lambda: optimizers["mask"].step())[0])
        optimizers["mask"].zero_grad(set_to_none=True)
    out = {f"{k}_s": statistics.median(v) for k, v in phases.items()}
    out["total_s"] = sum(out.values())
    out["repeats"] = args.merge_repeats
    return out


def driver(args) -> None:
    results = {"benchmark": "dam_step", "machine": common.machine(), "config": vars(args), "runs": []}
    for T in [int(t) for t in args.tasks.split(",")]:
        argv = [*common.forwarded_args(args), "--num-tasks", str(T), "--merge-repeats", str(args.merge_repeats)]
        if args.no_merge_share:
            argv.append("--no-merge-share")
        result = common.run_worker(["bench/dam_step.py", "--worker", *argv], src=args.src)
        result.setdefault("tasks", T)
        print(
            f"T={T} "
            + (
                f"{result['median_s']:.1f} s/step  peak {result['peak_rss_mb']:.0f} MB  base {result['rss_base_mb']:.0f} MB"
                + (
                    f"  merge {result['merge']['total_s']:.1f} s ({100 * result['merge_share']:.0f} %)"
                    if result.get("merge")
                    else ""
                )
                if "error" not in result
                else f"ERROR {result['error']}\n{result['stderr']}"
            ),
            flush=True,
        )
        results["runs"].append(result)
        common.save(results, args, "dam_step")
    print(table(results["runs"]))
    print("saved", common.save(results, args, "dam_step"))


def table(runs: list[dict]) -> str:
    runs = [r for r in runs if "error" not in r]
    lines = [
        "| T | s/step (median) | s/step per task | merge s/step | merge share | peak RSS MB | base RSS MB | step extra MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: r["tasks"]):
        merge = r.get("merge") or {}
        lines.append(
            f"| {r['tasks']} | {r['median_s']:.1f} | {r['median_s'] / r['tasks']:.1f} | "
            f"{merge.get('total_s', float('nan')):.1f} | {100 * r.get('merge_share', float('nan')):.0f} % | "
            f"{r['peak_rss_mb']:.0f} | {r['rss_base_mb']:.0f} | {r['step_extra_mb']:.0f} |"
        )
    if len(runs) >= 2:  # least-squares lines against T
        import numpy as np

        T = np.array([r["tasks"] for r in runs], dtype=float)
        for key, unit in (("median_s", "s"), ("peak_rss_mb", "MB"), ("rss_base_mb", "MB")):
            slope, intercept = np.polyfit(T, [r[key] for r in runs], 1)
            lines.append(f"\n{key}: ≈ {intercept:.1f} + {slope:.1f}·T {unit}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, tasks="2,4,6,8")
    parser.set_defaults(steps=2)  # a DAM step at T = 8 is ~2 min on one CPU thread
    parser.add_argument("--merge-repeats", type=int, default=3, help="repeats of the merge-share measurement")
    parser.add_argument("--no-merge-share", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num-tasks", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        common.emit(worker(args))
    else:
        driver(args)


if __name__ == "__main__":
    main()
