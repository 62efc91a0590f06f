"""Time of each conversion step on a ViT-B/32-sized random CLIP (``python -m safemerge.convert``).

A random transformers CLIPModel of openai/clip-vit-base-patch32's shape (and one CLIPVisionModel
expert) is saved, then converted in-process: hf-base, hf-expert, to-hf, and task-vectors on a
task_vectors-style zip pickle of the tower (stand-in classes registered only while it is written).
Each step is timed once, after a warm-up conversion of a tiny model (imports excluded).

    python bench/convert.py [--threads 2] [--out bench/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "convert.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from safemerge.convert.__main__ import main as convert

    tmp = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    config = CLIPConfig(  # openai/clip-vit-base-patch32
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=512,
    )
    CLIPModel(config).save_pretrained(tmp / "base_hf")
    CLIPVisionModel(config.vision_config).save_pretrained(tmp / "expert_hf")
    small = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(small).save_pretrained(tmp / "warm_hf")
    assert convert(["hf-base", str(tmp / "warm_hf"), str(tmp / "warm")]) == 0  # imports, not measured

    def timed(argv):
        start = time.perf_counter()
        assert convert(argv) == 0, argv
        return round(time.perf_counter() - start, 2)

    times = {"hf-base": timed(["hf-base", str(tmp / "base_hf"), str(tmp / "base")])}
    times["hf-expert"] = timed(
        ["hf-expert", str(tmp / "expert_hf"), str(tmp / "expert"), "--base", str(tmp / "base"), "--task", "mnist"]
    )
    times["to-hf"] = timed(["to-hf", str(tmp / "expert"), str(tmp / "expert_out")])

    # a task_vectors finetuned.pt of the same tower: ImageEncoder(CLIP without text transformer)
    modeling = types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        pass

    ImageEncoder.__module__, ImageEncoder.__qualname__, modeling.ImageEncoder = (
        "src.modeling",
        "ImageEncoder",
        ImageEncoder,
    )
    sys.modules["src"], sys.modules["src.modeling"] = types.ModuleType("src"), modeling
    clip = open_clip.create_model("ViT-B-32-quickgelu")
    del clip.transformer
    encoder = ImageEncoder()
    encoder.model = clip
    torch.save(encoder, tmp / "finetuned.pt")
    del sys.modules["src.modeling"], sys.modules["src"]
    weights = tmp / "base.safetensors"
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32-quickgelu").state_dict().items()}, str(weights)
    )
    times["task-vectors"] = timed(
        [
            "task-vectors",
            str(tmp / "finetuned.pt"),
            str(tmp / "tv"),
            "--task",
            "mnist",
            "--model",
            "ViT-B-32-quickgelu",
            "--pretrained",
            str(weights),
        ]
    )
    result = {"model": "ViT-B/32-sized random CLIP", "threads": args.threads, "seconds": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
