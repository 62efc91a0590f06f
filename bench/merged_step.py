"""Benchmark 1: one training step through the merged tower, against the floor and FusionBench.

A step = build θ0 + m ⊙ Σ_i λ_i τ_i from layer-wise λ [T, L] and a sampled concrete mask, one
forward of all T×batch images through the merged tower (tasks share the forward), the summed
per-task mean entropy, and the gradients of λ and the mask logits.

Variants, each in a fresh process per T:
  floor       plain forward + backward of the unmerged tower (weights require grad)
  ours        MergedEncoder.weights(λ, product(mask.sample()), rescale=True) + functional forward,
              grads → λ, mask (the package's masked merge, as MergeLearner calls it)
  ours_lambda the same with λ only (no mask)
  fb          FusionBench LayerWiseMergedModel + MaskModel as its Concrete AdaMerging mask step
  fb_concat   fb with the tasks' images in one forward, as ours (not run by default)
  fb_lambda   FusionBench LayerWiseMergedModel as its layer-wise AdaMerging step
(fb* run bench/fusionbench_step.py with the FusionBench venv's python, $FB_PYTHON.)

    python bench/merged_step.py --threads 1 --breakdown   # T = 4, 8; default variants; ~30 min on a busy 2-core box
    python bench/merged_step.py --tasks 8 --variants ours,floor
    python bench/merged_step.py --device cuda --bf16 --tasks 8 --batch 16
    python bench/merged_step.py --src /tmp/before --variants ours   # another checkout's safemerge
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = ("floor", "ours", "ours_lambda", "fb", "fb_concat", "fb_lambda")
DEFAULT = ("floor", "ours", "ours_lambda", "fb", "fb_lambda")


def worker(args) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from safemerge.merging import entropy

    common.setup_torch(args)
    memory = common.Memory(args.device)
    T, B, device = args.num_tasks, args.batch, args.device
    tower = common.make_tower(args.model, device)
    heads = common.make_heads(T, common.output_dim(tower, args.image_size), args.classes, args.seed, device)
    images = common.make_images(T, B, args.seed, device, size=args.image_size)
    tasks = list(images)

    def loss_of(features):
        features = F.normalize(features, dim=-1).split(B)
        return sum(entropy(f.to(heads[t].dtype) @ heads[t].T) for t, f in zip(tasks, features))

    def batch():
        return common.normalize(torch.cat([images[t] for t in tasks]))

    if args.variant == "floor":
        tower.requires_grad_(True)
        params = [p for p in tower.parameters()]

        def step():
            with common.autocast(args):
                loss = loss_of(tower(batch()))
            loss.backward()
            tower.zero_grad(set_to_none=True)

        def breakdown():
            t0 = time.perf_counter()
            with common.autocast(args):
                loss = loss_of(tower(batch()))
            common.synchronize(device)
            t1 = time.perf_counter()
            torch.autograd.grad(loss, params)
            common.synchronize(device)
            return {"forward_s": t1 - t0, "backward_tower_s": time.perf_counter() - t1}

    else:
        from safemerge.merging.masks import ConcreteMask
        from safemerge.merging.merged import MergedEncoder

        experts = [common.expert_state(tower, i, args.seed) for i in range(T)]
        encoder = MergedEncoder(tower, experts)
        del experts
        coefficients = encoder.coefficients("layer", 0.3).requires_grad_(True)
        use_mask = args.variant == "ours"
        mask = ConcreteMask(encoder.shapes, temperature=0.5).to(device) if use_mask else None
        learned = [coefficients, *(mask.parameters() if use_mask else ())]
        generator = torch.Generator(device).manual_seed(args.seed)

        try:  # the masked merge as MergeLearner forms it: one autograd node that rescales m
            from safemerge.merging.masks import product

            def masked(m):
                return encoder.weights(coefficients, product(m), rescale=True)
        except ImportError:  # a --src checkout from before the change (a658d87 and earlier)
            from safemerge.merging.masks import combine

            def masked(m):
                return encoder.weights(coefficients, combine(m))

        def sample():
            return mask.sample(generator) if use_mask else None

        def build(m):
            return encoder.weights(coefficients) if m is None else masked(m)

        def step():
            with common.autocast(args):
                weights = build(sample())
                loss = loss_of(encoder(batch(), weights))
            torch.autograd.grad(loss, learned)

        def breakdown():
            # the same step, split: mask sample, weight construction, forward, tower backward
            # (into the merged weights), merge backward (merged-weight grads → λ, mask logits)
            marks = [time.perf_counter()]

            def mark():
                common.synchronize(device)
                marks.append(time.perf_counter())

            with common.autocast(args):
                m = sample()
                mark()
                weights = build(m)
                mark()
                loss = loss_of(encoder(batch(), weights))
                mark()
            merged = [weights[n] for n in encoder.names]
            grads = torch.autograd.grad(loss, merged)
            mark()
            torch.autograd.grad(merged, learned, grads)
            mark()
            keys = ("sample_mask_s", "build_weights_s", "forward_s", "backward_tower_s", "backward_merge_s")
            return {k: b - a for k, a, b in zip(keys, marks, marks[1:])}

    memory.setup_done()
    times = common.time_steps(step, args.warmup, args.steps, device)
    info = memory.steps_done()
    parts = breakdown() if args.breakdown else {}
    return {"variant": args.variant, "tasks": T, "batch": B, **common.summarize(times), **info, "breakdown": parts}


def driver(args) -> None:
    variants = args.variants.split(",")
    results = {"benchmark": "merged_step", "machine": common.machine(), "config": vars(args), "runs": []}
    for T in [int(t) for t in args.tasks.split(",")]:
        for variant in variants:
            argv = [*common.forwarded_args(args), "--num-tasks", str(T), "--variant", variant]
            if args.breakdown:
                argv.append("--breakdown")
            if variant.startswith("fb"):
                result = common.run_worker(["bench/fusionbench_step.py", *argv], python=common.FB_PYTHON)
            else:
                result = common.run_worker(["bench/merged_step.py", "--worker", *argv], src=args.src)
            result.setdefault("variant", variant)
            result.setdefault("tasks", T)
            print(
                f"T={T} {variant:12s} "
                + (
                    f"{result['median_s']:.2f} s/step  peak {result['peak_rss_mb']:.0f} MB  base {result['rss_base_mb']:.0f} MB"
                    if "error" not in result
                    else f"ERROR {result['error']}\n{result['stderr']}"
                ),
                flush=True,
            )
            results["runs"].append(result)
            common.save(results, args, "merged_step")
    print(table(results["runs"]))
    print("saved", common.save(results, args, "merged_step"))


def table(runs: list[dict]) -> str:
    """Markdown table; ratios against floor and FusionBench at the same T from this run."""
    by = {(r["tasks"], r["variant"]): r for r in runs if "error" not in r}
    lines = [
        "| T | variant | s/step (median) | × floor | × FB (same mask setting) | peak RSS MB | × FB peak | base RSS MB | step extra MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (T, variant), r in sorted(by.items(), key=lambda kv: (kv[0][0], VARIANTS.index(kv[0][1]))):
        floor = by.get((T, "floor"))
        fb = by.get((T, "fb_lambda" if variant.endswith("lambda") else "fb"))
        ratio = lambda a, b, k: f"{a[k] / b[k]:.2f}" if b else "–"  # noqa: E731
        lines.append(
            f"| {T} | {variant} | {r['median_s']:.2f} | {ratio(r, floor, 'median_s')} | "
            f"{ratio(r, fb, 'median_s') if variant.startswith('ours') else '–'} | {r['peak_rss_mb']:.0f} | "
            f"{ratio(r, fb, 'peak_rss_mb') if variant.startswith('ours') else '–'} | {r['rss_base_mb']:.0f} | {r['step_extra_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, tasks="4,8")
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--breakdown", action="store_true", help="also time the phases of one extra step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--num-tasks", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        common.emit(worker(args))
    else:
        driver(args)


if __name__ == "__main__":
    main()
