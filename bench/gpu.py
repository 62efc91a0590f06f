"""The GPU figures in one command: ViT-B-32 at 224 px, T = 6 experts, 16 images per task, in
fp32 and bf16-mixed.

    python bench/gpu.py                  # on a CUDA machine: ~10 min; writes bench/results/gpu_cuda.{json,md}
    python bench/gpu.py --tiny           # a check of the script on a CPU (TinyCLIP-ViT-32, 32 px, T = 2, batch 2)

For each precision, in fresh processes (bench/merged_step.py and bench/dam_step.py workers):

- the merged-tower step (layer-wise λ × concrete mask, as DAM's mask phase) against the **floor**,
  the plain forward + backward of the same images (target: ≤ 1.1×), and the λ-only step
  (an AdaMerging step);
- one full DAM step (``DAMAdaMerging``, layer-wise, mask stage: inner λ, perturbation, mask);
- peak memory of each (CUDA allocator peak; RSS on a CPU);
- the projected wall time of a paper-scale DAM merge: 1,000 mask-stage steps + 1,000 AdaMerging
  steps (DAM.md), from the measured DAM step and λ-only step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PAPER = {"model": "ViT-B-32", "image_size": 224, "tasks": 6, "batch": 16, "device": "cuda", "steps": 10, "warmup": 3}
TINY = {"model": "TinyCLIP-ViT-32", "image_size": 32, "tasks": 2, "batch": 2, "device": "cpu", "steps": 1, "warmup": 1}
MASK_STEPS = ADAMERGING_STEPS = 1000
TARGET = 1.1  # merged step / floor


def _argv(setting: dict, bf16: bool, threads: int) -> list[str]:
    return [
        "--num-tasks",
        str(setting["tasks"]),
        "--batch",
        str(setting["batch"]),
        "--steps",
        str(setting["steps"]),
        "--warmup",
        str(setting["warmup"]),
        "--model",
        setting["model"],
        "--image-size",
        str(setting["image_size"]),
        "--device",
        setting["device"],
        "--threads",
        str(threads),
        *(["--bf16"] if bf16 else []),
    ]


def _peak_mb(result: dict) -> float:
    return result.get("cuda_peak_mb", result.get("peak_rss_mb", float("nan")))


def measure(setting: dict, bf16: bool, threads: int) -> dict:
    argv = _argv(setting, bf16, threads)
    runs = {
        variant: common.run_worker(["bench/merged_step.py", "--worker", *argv, "--variant", variant])
        for variant in ("floor", "ours", "ours_lambda")
    }
    runs["dam"] = common.run_worker(["bench/dam_step.py", "--worker", *argv, "--no-merge-share"])
    errors = {k: r for k, r in runs.items() if "error" in r}
    if errors:
        raise SystemExit(f"error: a benchmark worker failed: {json.dumps(errors)[:3000]}")
    step = {k: r["median_s"] for k, r in runs.items()}
    return {
        "precision": "bf16-mixed" if bf16 else "fp32",
        "floor_s": step["floor"],
        "merged_step_s": step["ours"],
        "lambda_step_s": step["ours_lambda"],
        "dam_step_s": step["dam"],
        "merged_over_floor": step["ours"] / step["floor"],
        "meets_target": step["ours"] / step["floor"] <= TARGET,
        "peak_mb": {k: _peak_mb(r) for k, r in runs.items()},
        "paper_dam_merge_h": (MASK_STEPS * step["dam"] + ADAMERGING_STEPS * step["ours_lambda"]) / 3600,
        "runs": runs,
    }


def table(rows: list[dict], setting: dict) -> str:
    lines = [
        f"{setting['model']}, {setting['image_size']} px, T = {setting['tasks']}, {setting['batch']} images per task, "
        f"{setting['device']}; median of {setting['steps']} steps after {setting['warmup']} warm-up.",
        "",
        "| precision | floor s/step | merged step s | merged / floor (target ≤ 1.1) | λ-only step s | DAM step s "
        "| peak MB: floor / merged / DAM | paper DAM merge (1000 + 1000 steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_mb"]
        lines.append(
            f"| {r['precision']} | {r['floor_s']:.3f} | {r['merged_step_s']:.3f} | {r['merged_over_floor']:.2f}"
            f"{' (met)' if r['meets_target'] else ' (missed)'} | {r['lambda_step_s']:.3f} | {r['dam_step_s']:.3f} "
            f"| {peak['floor']:.0f} / {peak['ours']:.0f} / {peak['dam']:.0f} | {r['paper_dam_merge_h']:.2f} h |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="check the script on a CPU with a tiny model")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the workers (0: torch's default)")
    parser.add_argument("--out", help="output prefix (default: bench/results/gpu_<device>)")
    args = parser.parse_args()
    setting = TINY if args.tiny else PAPER
    if setting["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device; bench/gpu.py --tiny checks the script on a CPU")
    rows = [measure(setting, bf16, args.threads) for bf16 in (False, True)]
    out = Path(args.out) if args.out else common.RESULTS / f"gpu_{setting['device']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu", "machine": common.machine(), "setting": setting, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    markdown = table(rows, setting)
    out.with_suffix(".md").write_text(markdown)
    print(markdown + f"saved {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
