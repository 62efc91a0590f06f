"""An expert or merged tower -> a transformers directory (``to-hf``).

The architecture is read off the open_clip modules the expert's base builds, not off a config
name, so every base safemerge loads exports the same way; a tower transformers' CLIP cannot
express (attention pooling, layer scale, another activation) is refused. A ``CLIPVisionModel``
has no projection: its ``pooler_output`` is open_clip's tower output before ``proj``.
``--full`` writes a ``CLIPModel`` with the base's text tower, so ``get_image_features`` is
open_clip's ``encode_image``.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from torch import nn

from safemerge.convert.hf import clip_pairs, copy_tokenizer, to_hf, vision_pairs
from safemerge.errors import CheckpointError
from safemerge.io import atomic_directory, check_weights, read_expert
from safemerge.models.loading import load_clip


def _activation(module: nn.Module, source: str) -> str:
    gelu = module.mlp.gelu
    if isinstance(gelu, open_clip.transformer.QuickGELU):
        return "quick_gelu"
    if type(gelu) is nn.GELU and gelu.approximate == "none":
        return "gelu"
    raise CheckpointError(f"{source}: activation {type(gelu).__name__} has no transformers CLIP equivalent")


def _tower_config(transformer: nn.Module, source: str) -> dict:
    blocks = transformer.resblocks
    first = blocks[0]
    if (
        any(not isinstance(getattr(first, name, nn.Identity()), nn.Identity) for name in ("ls_1", "ls_2", "ln_attn"))
        or not isinstance(first.attn, nn.MultiheadAttention)
        or first.ln_1.eps != 1e-5
    ):
        raise CheckpointError(f"{source}: its transformer blocks are not CLIP's (layer scale, extra norms or eps)")
    width = first.attn.embed_dim
    return {
        "hidden_size": width,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": first.attn.num_heads,
        "intermediate_size": first.mlp.c_fc.out_features,
        "hidden_act": _activation(first, source),
        "layer_norm_eps": 1e-5,
    }


def vision_config(visual: nn.Module, source: str) -> dict:
    """The ``CLIPVisionConfig`` arguments of an open_clip image tower (refusing what HF cannot express)."""
    if (
        not isinstance(visual, open_clip.transformer.VisionTransformer)
        or visual.attn_pool is not None
        or visual.pool_type != "tok"
        or visual.final_ln_after_pool
        or visual.conv1.bias is not None
        or isinstance(visual.ln_pre, nn.Identity)
    ):
        raise CheckpointError(
            f"{source}: only a CLIP ViT tower (class-token pooling, no attention pool) exports to transformers"
        )
    size = visual.image_size
    return {
        **_tower_config(visual.transformer, source),
        "image_size": size[0] if isinstance(size, tuple) else size,
        "patch_size": visual.conv1.kernel_size[0],
        "projection_dim": visual.output_dim,
    }


def export(source: Path, out: Path, full: bool = False) -> Path:
    """Write ``out`` (a ``CLIPVisionModel`` directory, or with ``full`` a ``CLIPModel``) from an expert directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per conversion, not a progress bar per shard

    expert = read_expert(source)
    clip = load_clip(expert.info["model"], expert.info.get("pretrained"))
    name = f"expert {source}"
    check_weights(expert.encoder, clip.visual.state_dict(), name)
    vision = vision_config(clip.visual, f"{name} (base {clip.name})")
    layers = vision["num_hidden_layers"]
    if full:
        model = clip.model
        if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(model.text_projection, nn.Parameter):
            raise CheckpointError(f"{name}: the base's text tower is not CLIP's; export without --full")
        text = {
            **_tower_config(model.transformer, f"{name} (text tower)"),
            "vocab_size": model.token_embedding.num_embeddings,
            "max_position_embeddings": model.positional_embedding.shape[0],
            "projection_dim": vision["projection_dim"],
        }
        if text["hidden_act"] != vision["hidden_act"]:
            raise CheckpointError(f"{name}: the towers use different activations; transformers' CLIP has one per tower")
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=vision["projection_dim"])
        hf_model = CLIPModel(config)
        state = {**model.state_dict(), **{f"visual.{k}": v for k, v in expert.encoder.items()}}
        weights = to_hf(state, clip_pairs(layers, text["num_hidden_layers"]))
    else:
        hf_model = CLIPVisionModel(CLIPVisionConfig(**vision))
        expected = hf_model.state_dict()
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in expected) else ""
        weights = to_hf(expert.encoder, vision_pairs(layers, prefix))
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:  # the table and transformers disagree: a bug, not bad input
        raise RuntimeError(f"to-hf name table out of date: missing {missing[:3]}, unexpected {unexpected[:3]}")
    base_dir = Path(clip.name.removeprefix("local-dir:")) if clip.name.startswith("local-dir:") else None
    with atomic_directory(out) as tmp:
        hf_model.save_pretrained(tmp)
        if full and base_dir is not None:
            copy_tokenizer(base_dir, tmp)
    return out
