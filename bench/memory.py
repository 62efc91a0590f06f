"""Memory at scale: what DAM and layer-wise AdaMerging hold for T experts on a CLIP image tower.

Measured, not guessed, where it can be on a CPU:

- **parameters**: every tensor of the image tower, counted on the ``meta`` device (no memory);
- **activations per image**: the bytes autograd saves for the backward of one training forward
  at the real image size (saved-tensor hooks on a real CPU forward of ``--act-batch`` images,
  parameters excluded), in float32 and under bf16 autocast;

then the peak of one step is projected from them (see ``state_bytes`` / ``peak_bytes``), and
``--validate`` checks the projection against the measured peak RSS of a real DAM step of
``bench/dam_step.py`` on ViT-B-32 with small T and batch.

    python bench/memory.py                              # ViT-B-32 and ViT-L-14, T = 2, 4, 8
    python bench/memory.py --validate --threads 1       # + a measured DAM step (ViT-B-32, T = 2, batch 2)
    python bench/memory.py --models TinyCLIP-ViT-32 --image-size 32 --out /tmp/m.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GB = 1e9

# Persistent and per-step model-sized tensors, in units of P float32 values, of the step that
# peaks (DAM: the mask step; AdaMerging: its λ step). Task vectors are counted separately (T of
# them, in their storage dtype).
#   base θ0 (1), merged weights θ(λ, m) (1), their gradients during the backward (1);
#   DAM adds mask logits (1), Adam's two moments (2), the logits' gradient (1), the mask sample (1).
MODEL_SIZED = {"adamerging": 3, "dam": 8}
# Images in one forward of that step per image of the per-task batch: DAM's mask step forwards
# clean and perturbed images together.
FORWARD_IMAGES = {"adamerging": 1, "dam": 2}


def tower_parameters(model: str) -> dict:
    """Per-tensor sizes of the image tower, built on the meta device."""
    import open_clip

    sys.path.insert(0, str(common.ROOT))
    import safemerge.models  # noqa: F401  (registers safemerge's own architectures)

    tower = open_clip.create_model(model, device="meta").visual
    tensors = {name: t.numel() for name, t in tower.state_dict().items() if t.is_floating_point()}
    return {
        "model": model,
        "tensors": len(tensors),
        "parameters": sum(tensors.values()),
        "largest_tensor": max(tensors.values()),
        "fp32_bytes": 4 * sum(tensors.values()),
    }


def saved_bytes(model: str, image_size: int, batch: int, bf16: bool) -> float:
    """Bytes autograd saves for the backward of one forward of ``batch`` images (parameters
    excluded; under autocast their bf16 copies are included: a per-forward constant)."""
    import open_clip

    torch.manual_seed(0)
    tower = open_clip.create_model(model).visual.train(False).requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in tower.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    images = torch.rand(batch, 3, image_size, image_size)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        tower(images).float().square().sum()
    return sum(seen.values())


def activations(model: str, image_size: int, batch: int, bf16: bool) -> tuple[float, float]:
    """(bytes per image, bytes per forward whatever the batch) from forwards of ``batch`` and
    ``2 * batch`` images."""
    one, two = (saved_bytes(model, image_size, b, bf16) for b in (batch, 2 * batch))
    per_image = (two - one) / batch
    return per_image, one - batch * per_image


def state_bytes(P: int, T: int, method: str, vector_bytes: int = 4) -> float:
    return MODEL_SIZED[method] * 4 * P + T * vector_bytes * P


def peak_bytes(
    P: int,
    T: int,
    method: str,
    act: tuple[float, float],
    batch: int = 16,
    vector_bytes: int = 4,
    chunk: int | None = None,
) -> float:
    """Projected peak of one step: state + activations of the images alive at once (``act``:
    bytes per image and per forward, from :func:`activations`)."""
    images = FORWARD_IMAGES[method] * T * batch
    per_image, per_forward = act
    return state_bytes(P, T, method, vector_bytes) + per_forward + per_image * (min(chunk, images) if chunk else images)


SETTINGS = {  # name -> (bf16 autocast, task-vector bytes, checkpoint_chunk)
    "fp32": (False, 4, None),
    "bf16-mixed": (True, 4, None),
    "bf16-mixed, bf16 τ": (True, 2, None),
    "bf16-mixed, bf16 τ, checkpoint_chunk 16": (True, 2, 16),
}


def projections(towers: dict, tasks: list[int], batch: int) -> list[dict]:
    rows = []
    for model, info in towers.items():
        for method in ("dam", "adamerging"):
            for T in tasks:
                row = {
                    "model": model,
                    "method": method,
                    "T": T,
                    "batch": batch,
                    "state_gb": state_bytes(info["parameters"], T, method) / GB,
                }
                for name, (bf16, vector_bytes, chunk) in SETTINGS.items():
                    act = info["act_bf16"] if bf16 else info["act_fp32"]
                    row[name] = peak_bytes(info["parameters"], T, method, act, batch, vector_bytes, chunk) / GB
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    header = ["model", "method", "T", "state GB (fp32 τ)", *[f"peak GB: {s}" for s in SETTINGS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [r["model"], r["method"], str(r["T"]), f"{r['state_gb']:.1f}", *[f"{r[s]:.1f}" for s in SETTINGS]]
            )
            + " |"
        )
    return "\n".join(lines)


def validate(args, tower: dict) -> dict:
    """A real DAM mask step (bench/dam_step.py) against the projection at the same T and batch."""
    T, batch = 2, 2
    argv = [
        "bench/dam_step.py",
        "--worker",
        "--num-tasks",
        str(T),
        "--batch",
        str(batch),
        "--steps",
        "1",
        "--warmup",
        "1",
        "--model",
        tower["model"],
        "--threads",
        str(args.threads),
        "--no-merge-share",
    ]
    result = common.run_worker(argv)
    if "error" in result:
        return result
    measured = (result["peak_rss_mb"] - result["rss_import_mb"]) * 2**20
    projected = peak_bytes(tower["parameters"], T, "dam", tower["act_fp32"], batch)
    return {
        "model": tower["model"],
        "T": T,
        "batch": batch,
        "measured_gb": measured / GB,
        "projected_gb": projected / GB,
        "measured_over_projected": measured / projected,
        "dam_step": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--tasks", default="2,4,8")
    parser.add_argument("--batch", type=int, default=16, help="images per task per step (reference: 16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--act-batch", type=int, default=1, help="images of the smaller measured forward")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--validate", action="store_true", help="measure a real DAM step of the first model (T = 2, batch 2)"
    )
    parser.add_argument("--out", default=str(common.RESULTS / "memory.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    towers = {}
    for model in args.models.split(","):
        info = tower_parameters(model)
        info["act_fp32"] = activations(model, args.image_size, args.act_batch, bf16=False)
        info["act_bf16"] = activations(model, args.image_size, args.act_batch, bf16=True)
        towers[model] = info
        print(
            f"{model}: {info['parameters'] / 1e6:.1f} M parameters in {info['tensors']} tensors "
            f"({info['fp32_bytes'] / GB:.2f} GB fp32); saved for backward at {args.image_size} px: "
            f"{info['act_fp32'][0] / 2**20:.1f} MiB per image fp32, {info['act_bf16'][0] / 2**20:.1f} MiB per image "
            f"+ {info['act_bf16'][1] / 2**20:.0f} MiB per forward bf16-mixed",
            flush=True,
        )
    rows = projections(towers, [int(t) for t in args.tasks.split(",")], args.batch)
    results = {
        "benchmark": "memory",
        "machine": common.machine(),
        "config": vars(args),
        "towers": towers,
        "projections": rows,
    }
    if args.validate:
        results["validation"] = validate(args, next(iter(towers.values())))
        print("validation:", json.dumps({k: v for k, v in results["validation"].items() if k != "dam_step"}))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(table(rows))
    print("saved", path)


if __name__ == "__main__":
    main()
