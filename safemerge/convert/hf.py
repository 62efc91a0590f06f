"""Hugging Face transformers CLIP <-> open_clip: names, configs, and the two directions.

The tensors are the same; only their names and layout differ (see FORMATS.md): q, k, v
projections are concatenated into open_clip's ``in_proj``, the two projections are transposed,
the rest is renamed. One table (:func:`name_pairs`) drives both directions, so import and export
cannot drift apart. A ``CLIPVisionModel`` saved by transformers 4.x puts its tower under
``vision_model.``; one saved by transformers 5.x has no prefix: both are read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safemerge.errors import CheckpointError, ConfigError, WeightsUnavailableError
from safemerge.io import StateDict, load_tensors, read_json

# OpenAI's normalisation, used when the checkpoint has no preprocessor_config.json.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_CONFIG = "hf_config.json"  # the source's config.json, kept in a converted base for to-hf --full
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Buffers some transformers 4.x files carry; they are recomputed, not weights.
_IGNORED = ("embeddings.position_ids",)

# (open_clip name, HF name(s), how): "same", "transpose", or "qkv" (HF's q, k, v stacked on dim 0)
Pair = tuple[str, str | tuple[str, str, str], str]


# ----------------------------------------------------------------------------- names


def _block_pairs(oc: str, hf: str) -> list[Pair]:
    pairs: list[Pair] = []
    for kind in ("weight", "bias"):
        pairs.append((f"{oc}attn.in_proj_{kind}", tuple(f"{hf}self_attn.{x}_proj.{kind}" for x in "qkv"), "qkv"))
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            pairs.append((f"{oc}{ours}.{kind}", f"{hf}{theirs}.{kind}", "same"))
    return pairs


def vision_pairs(layers: int, hf_prefix: str = "") -> list[Pair]:
    """The image tower: open_clip names as in ``clip.visual.state_dict()``, HF names under ``hf_prefix``."""
    pairs: list[Pair] = [
        ("conv1.weight", f"{hf_prefix}embeddings.patch_embedding.weight", "same"),
        ("class_embedding", f"{hf_prefix}embeddings.class_embedding", "same"),
        ("positional_embedding", f"{hf_prefix}embeddings.position_embedding.weight", "same"),
    ]
    for kind in ("weight", "bias"):
        pairs += [
            (f"ln_pre.{kind}", f"{hf_prefix}pre_layrnorm.{kind}", "same"),
            (f"ln_post.{kind}", f"{hf_prefix}post_layernorm.{kind}", "same"),
        ]
    for i in range(layers):
        pairs += _block_pairs(f"transformer.resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}.")
    return pairs


def clip_pairs(vision_layers: int, text_layers: int) -> list[Pair]:
    """A whole CLIPModel: open_clip names as in ``clip.state_dict()``."""
    pairs: list[Pair] = [("visual." + oc, hf, how) for oc, hf, how in vision_pairs(vision_layers, "vision_model.")]
    pairs += [
        ("visual.proj", "visual_projection.weight", "transpose"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", "same"),
        ("ln_final.weight", "text_model.final_layer_norm.weight", "same"),
        ("ln_final.bias", "text_model.final_layer_norm.bias", "same"),
        ("text_projection", "text_projection.weight", "transpose"),
        ("logit_scale", "logit_scale", "same"),
    ]
    for i in range(text_layers):
        pairs += _block_pairs(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.")
    return pairs


def to_open_clip(hf: Mapping[str, Tensor], pairs: list[Pair], source: str) -> StateDict:
    """HF tensors -> open_clip tensors; a missing or unexpected HF tensor is an error."""
    wanted = {name for _, names, _ in pairs for name in ((names,) if isinstance(names, str) else names)}
    present = {k for k in hf if not k.endswith(_IGNORED)}
    missing, unexpected = sorted(wanted - present), sorted(present - wanted)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match its config.json: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    out = {}
    for ours, theirs, how in pairs:
        if how == "qkv":
            out[ours] = torch.cat([hf[name] for name in theirs], dim=0)
        elif how == "transpose":
            out[ours] = hf[theirs].T.contiguous()
        else:
            out[ours] = hf[theirs]
    return out


def to_hf(state: Mapping[str, Tensor], pairs: list[Pair]) -> StateDict:
    """open_clip tensors -> HF tensors (the inverse of :func:`to_open_clip`)."""
    out = {}
    for ours, theirs, how in pairs:
        tensor = state[ours]
        if how == "qkv":
            for name, part in zip(theirs, tensor.chunk(3, dim=0)):
                out[name] = part.contiguous()
        elif how == "transpose":
            out[theirs] = tensor.T.contiguous()
        else:
            out[theirs] = tensor
    return out


# ----------------------------------------------------------------------------- reading HF directories


def resolve_source(source: str) -> Path:
    """A local directory, or a hub id (``org/name``) already in the local Hugging Face cache.

    Never downloads: on a machine with network, ``huggingface-cli download org/name`` first.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{source} is a file; give the directory that holds config.json and model.safetensors")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(source, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
    raise WeightsUnavailableError(
        f"{source} is neither a directory nor a hub id in the local Hugging Face cache; on a machine with network "
        f"run `huggingface-cli download {source}` (then copy ~/.cache/huggingface here, or set HF_HOME), or give the directory"
    )


def read_hf(directory: Path, expected: tuple[str, ...]) -> tuple[dict[str, Any], StateDict]:
    """``config.json`` (model_type one of ``expected``) and the weights of a transformers CLIP directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a transformers model directory: it has no config.json")
    config = read_json(config_path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in expected:
        raise CheckpointError(
            f"{config_path} describes a {model_type!r} model, not CLIP ({' or '.join(expected)}); "
            "give a transformers CLIPModel (base) or CLIPVisionModel (expert) directory"
        )
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return config, load_tensors(directory / name)  # a .bin is read weights-only
    if any(directory.glob("*.index.json")):
        raise CheckpointError(
            f"{directory} holds a sharded checkpoint; merge its shards into one model.safetensors first"
        )
    raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _config_object(config: dict[str, Any], kind: str):
    """transformers' config class fills in every default a saved config.json may leave out."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    cls = {"clip": CLIPConfig, "vision": CLIPVisionConfig, "text": CLIPTextConfig}[kind]
    try:
        return cls(**{k: v for k, v in config.items() if k not in ("transformers_version", "architectures")})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config.json is not a valid {cls.__name__} ({err})") from None


def vision_cfg(config: dict[str, Any], source: str) -> tuple[dict[str, Any], bool]:
    """open_clip's ``vision_cfg`` and whether the tower uses QuickGELU, from an HF vision config."""
    v = _config_object(config, "vision")
    _check_common(v, f"{source} (vision)")
    return {
        "image_size": v.image_size,
        "layers": v.num_hidden_layers,
        "width": v.hidden_size,
        "head_width": v.hidden_size // v.num_attention_heads,
        "mlp_ratio": v.intermediate_size / v.hidden_size,
        "patch_size": v.patch_size,
    }, v.hidden_act == "quick_gelu"


def _check_common(c, source: str) -> None:
    """What open_clip's transformer cannot express is refused, not approximated."""
    if c.hidden_act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{source}: activation {c.hidden_act!r} has no open_clip equivalent (quick_gelu or gelu)")
    if c.layer_norm_eps != 1e-5:
        raise CheckpointError(f"{source}: layer_norm_eps {c.layer_norm_eps} differs from open_clip's 1e-5")
    if c.hidden_size % c.num_attention_heads:
        raise CheckpointError(
            f"{source}: hidden_size {c.hidden_size} is not a multiple of {c.num_attention_heads} heads"
        )
    if int(c.hidden_size * (c.intermediate_size / c.hidden_size)) != c.intermediate_size:
        raise CheckpointError(f"{source}: intermediate_size {c.intermediate_size} is not expressible as an mlp_ratio")


def open_clip_model_cfg(config: dict[str, Any], source: str) -> dict[str, Any]:
    """open_clip's ``model_cfg`` for an HF CLIPModel config (QuickGELU included)."""
    clip = _config_object(config, "clip")
    vision, vision_quick = vision_cfg(clip.vision_config.to_dict(), source)
    t = clip.text_config
    _check_common(t, f"{source} (text)")
    if (t.hidden_act == "quick_gelu") != vision_quick:
        raise CheckpointError(f"{source}: the towers use different activations; open_clip has one quick_gelu flag")
    if t.eos_token_id not in (2, t.vocab_size - 1):
        # open_clip pools the text at argmax(ids): the end-of-text token must be the largest id
        raise CheckpointError(
            f"{source}: eos_token_id {t.eos_token_id} is not the last id; open_clip's pooling needs it"
        )
    text = {
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_hidden_layers,
        "mlp_ratio": t.intermediate_size / t.hidden_size,
    }
    return {"embed_dim": clip.projection_dim, "quick_gelu": vision_quick, "vision_cfg": vision, "text_cfg": text}


def preprocess_cfg(directory: Path) -> dict[str, Any]:
    path = directory / "preprocessor_config.json"
    if path.is_file():
        document = read_json(path)
        if isinstance(document, dict) and "image_mean" in document and "image_std" in document:
            return {"mean": list(document["image_mean"]), "std": list(document["image_std"])}
    return {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}


def check_tokenizer(directory: Path) -> None:
    """The base's vocabulary must be CLIP's BPE: open_clip's tokenizer (what load_clip uses) replaces it."""
    path = directory / "vocab.json"
    if not path.is_file():
        return
    from open_clip.tokenizer import SimpleTokenizer

    ours = dict(SimpleTokenizer().encoder)
    ours["<|startoftext|>"], ours["<|endoftext|>"] = ours.pop("<start_of_text>"), ours.pop("<end_of_text>")
    if read_json(path) != ours:
        raise CheckpointError(
            f"{path} is not CLIP's BPE vocabulary; safemerge tokenizes with open_clip's CLIP tokenizer, which would give other ids"
        )


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def base_config(base: Path) -> dict[str, Any]:
    """The ``model_cfg`` of a converted base (a ``local-dir:`` open_clip folder)."""
    path = base / "open_clip_config.json"
    if not path.is_file():
        raise ConfigError(
            f"--base {base} is not an open_clip local-dir model (no open_clip_config.json): give the OUT of hf-base"
        )
    document = read_json(path)
    if not isinstance(document, dict) or not isinstance(document.get("model_cfg"), dict):
        raise CheckpointError(f"{path} has no model_cfg")
    return document["model_cfg"]


def vision_mismatches(expert: dict[str, Any], expert_quick: bool, base: dict[str, Any]) -> list[str]:
    """The vision settings in which an expert differs from its base (open_clip's defaults filled in)."""
    defaults = {"head_width": 64, "mlp_ratio": 4.0, "patch_size": 16, "image_size": 224, "layers": 12, "width": 768}
    base_vision = {**defaults, **base.get("vision_cfg", {})}
    found = [f"{key} {expert[key]} (base {base_vision[key]})" for key in expert if expert[key] != base_vision[key]]
    if expert_quick != bool(base.get("quick_gelu", False)):
        found.append(f"activation {'quick_gelu' if expert_quick else 'gelu'} (base the other)")
    return found


def local_dir(path: str | os.PathLike) -> str:
    return f"local-dir:{Path(path).resolve()}"


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the two imports


def convert_base(source: str, out: Path) -> Path:
    """``hf-base``: a transformers CLIPModel -> a ``local-dir:`` open_clip model folder.

    Writes ``open_clip_config.json`` (architecture, QuickGELU, mean/std), ``open_clip_model.safetensors``,
    the source's ``config.json`` as ``hf_config.json`` and its tokenizer files. The folder is
    built beside ``out`` and checked by loading it as safemerge will before it is renamed into place.
    """
    from safemerge.io import atomic_directory, save_tensors
    from safemerge.models.loading import load_clip

    directory = resolve_source(source)
    config, hf = read_hf(directory, ("clip",))
    model_cfg = open_clip_model_cfg(config, str(directory))
    check_tokenizer(directory)
    pairs = clip_pairs(model_cfg["vision_cfg"]["layers"], model_cfg["text_cfg"]["layers"])
    state = to_open_clip(hf, pairs, f"{directory} weights")
    with atomic_directory(out) as tmp:
        dump(tmp / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(directory)})
        save_tensors(tmp / "open_clip_model.safetensors", state)
        dump(tmp / HF_CONFIG, config)
        copy_tokenizer(directory, tmp)
        load_clip(f"local-dir:{tmp}")  # builds the architecture and checks every tensor against it
    return out


def convert_expert(source: str, out: Path, base: Path, task: str) -> Path:
    """``hf-expert``: a transformers CLIPVisionModel -> a safemerge expert directory against ``base``.

    The expert has no projection (transformers' vision model has none): ``proj`` is the base's.
    """
    from safemerge.data.registry import get_task
    from safemerge.errors import UnknownTaskError
    from safemerge.io import Expert, check_weights, expert_info, write_expert

    try:
        known = get_task(task)  # an unknown task fails before anything is read
    except UnknownTaskError as err:
        raise UnknownTaskError(f"--task for {source}: {err}") from None
    model_cfg = base_config(base)
    directory = resolve_source(source)
    config, hf = read_hf(directory, ("clip_vision_model",))
    vision, quick = vision_cfg(config, str(directory))
    mismatches = vision_mismatches(vision, quick, model_cfg)
    if mismatches:
        raise CheckpointError(f"{directory} does not match the base {base}: {'; '.join(mismatches)}")
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf) else ""
    encoder = to_open_clip(hf, vision_pairs(vision["layers"], prefix), f"{directory} weights")
    base_state = load_tensors(base / "open_clip_model.safetensors")
    encoder["proj"] = base_state["visual.proj"]
    visual = {k.removeprefix("visual."): v for k, v in base_state.items() if k.startswith("visual.")}
    check_weights(encoder, visual, f"expert {directory}")
    info = expert_info(
        model=local_dir(base),
        pretrained=None,
        task=known.name,
        num_classes=known.num_classes,
        backdoor=None,
        metrics={"accuracy": None, "asr": None},
        image_size=vision["image_size"],
    )
    write_expert(out, Expert(encoder=encoder, info=info))
    return out
