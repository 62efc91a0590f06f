"""Offline stand-ins for paper-scale runs in tests: random weights for pretrained tags such as
'openai', random zero-shot heads, and a tiny fake dataset (right image size and class count) for
every split of every task. ``python tests/paper_fakes.py fit --config ...`` is ``trainer.py``
with them installed (a fresh process per run keeps the tests' memory flat)."""

import sys
from pathlib import Path

import torch

IMAGES = 4  # images per fake split


def fake_split(task, split, *, root, image_size, download, seed):
    generator = torch.Generator().manual_seed(sum(map(ord, task.name + split)))
    images = torch.rand(IMAGES, 3, image_size, image_size, generator=generator)
    return torch.utils.data.TensorDataset(images, torch.arange(IMAGES) % task.num_classes)


def random_weights(model, pretrained, device, quick_gelu=False):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(model, device=device, force_quick_gelu=quick_gelu)


def random_head(clip, classnames, prompts):
    generator = torch.Generator().manual_seed(len(classnames))
    head = torch.randn(len(classnames), clip.model.visual.output_dim, generator=generator)
    return 100 * torch.nn.functional.normalize(head, dim=-1)


def install(patch=setattr) -> None:
    import safemerge.data.datamodule as datamodule
    import safemerge.data.merge as merge_data
    import safemerge.models.heads as heads
    import safemerge.models.loading as loading

    patch(datamodule, "build_split", fake_split)
    patch(merge_data, "build_split", fake_split)
    patch(loading, "_create_with_downloaded_weights", random_weights)
    patch(heads, "zero_shot_head", random_head)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install()
    from safemerge.cli import main

    main(sys.argv[1:])
