"""Fine-tuning recipe options: which blocks of the image tower are tuned."""

import lightning as L
import pytest
import torch

from safemerge.data import TaskDataModule
from safemerge.errors import ConfigError
from safemerge.modules import FinetuneModule


def test_tuned_blocks_trains_only_the_last_blocks_and_leaves_the_rest_at_the_base(tmp_path):
    module = FinetuneModule(model="TinyCLIP-ViT-32", pretrained=None, lr=1e-2, warmup_steps=0, tuned_blocks=1)
    tower = module.clip.visual
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    trainable = {name for name, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {
        name
        for name, _ in tower.named_parameters()
        if name.startswith(("transformer.resblocks.1.", "ln_post.")) or name == "proj"
    }
    data = TaskDataModule("digits", batch_size=16, eval_batch_size=100, image_size=module.image_size)
    L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module, datamodule=data)
    after = tower.state_dict()
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved and all(k.startswith(("transformer.resblocks.1.", "ln_post.")) or k == "proj" for k in moved)


@pytest.mark.parametrize("count, message", [(3, "tuned_blocks must be in 0..2"), (-1, "tuned_blocks must be in 0..2")])
def test_tuned_blocks_out_of_range_is_a_clear_error(count, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneModule(model="TinyCLIP-ViT-32", pretrained=None, tuned_blocks=count)
