"""Loading open_clip models: by name and pretrained tag, ``hf-hub:``, ``local-dir:``, a local
weights file, or a custom architecture from a JSON config.

Local weights are read through :mod:`safemerge.io` (never unpickling arbitrary objects).
The activation follows the weights: a pretrained tag that open_clip's registry marks as trained
with QuickGELU (OpenAI's, among others) gets QuickGELU towers (:func:`resolve_quick_gelu`).
Weights that must come from the network fail fast with a message that says how to provide them
locally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

from safemerge.errors import CheckpointError, ConfigError, WeightsUnavailableError
from safemerge.io import check_weights, load_tensors

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# Architectures shipped with safemerge (tiny towers for tests and the mini benchmark) are
# registered like open_clip's own, so they are usable by name.
ARCHITECTURES = Path(__file__).with_name("architectures")
open_clip.add_model_config(ARCHITECTURES)
BUNDLED_WEIGHTS = Path(__file__).with_name("pretrained")


@dataclass
class CLIPModel:
    """A loaded open_clip model with what safemerge needs to build classifiers from it."""

    model: nn.Module
    tokenizer: Any
    name: str
    pretrained: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int

    @property
    def visual(self) -> nn.Module:
        return self.model.visual


def register_architecture(config_path: str | os.PathLike) -> str:
    """Register a custom open_clip architecture from a JSON config; returns its model name.

    The name is the file's stem, as open_clip names its own configs (``ViT-B-32.json``).
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model config {path} is not valid JSON: {err}") from err
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ConfigError(
            f"model config {path} is not an open_clip architecture: it needs the keys "
            "embed_dim, vision_cfg and text_cfg (see open_clip/model_configs/*.json)"
        )
    open_clip.add_model_config(path)
    return path.stem


def load_clip(
    model: str,
    pretrained: str | None = None,
    *,
    config: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> CLIPModel:
    """Create an open_clip model and load its weights.

    Args:
        model: an open_clip architecture name (``ViT-B-32``), ``hf-hub:org/repo`` or
            ``local-dir:/path`` (a folder with ``open_clip_config.json`` and weights).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a path to
            a local weights file, or None for random weights. Ignored for ``hf-hub:`` and
            ``local-dir:`` names.
        config: a JSON file with a custom architecture; its stem must equal ``model``.
    """
    schema = _model_schema(model, config)
    quick_gelu = resolve_quick_gelu(model, pretrained) if schema is None else False
    local_weights = _local_weights(model, pretrained, schema)
    clip = _build_architecture(model, pretrained, schema, local_weights, device, quick_gelu)

    if local_weights is not None:
        state = load_tensors(local_weights)
        check_weights(state, clip.state_dict(), f"weights {local_weights} for architecture {model!r}")
        clip.load_state_dict(state)
    clip.eval()
    preprocess = clip.visual.preprocess_cfg
    size = preprocess["size"]
    image_size = size if isinstance(size, int) else size[0]
    tokenizer = open_clip.get_tokenizer(model)
    context_length = getattr(clip, "context_length", None) or tokenizer.context_length
    return CLIPModel(
        model=clip,
        tokenizer=tokenizer,
        name=model,
        pretrained=pretrained if schema is None else None,
        image_size=int(image_size),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
        context_length=int(context_length),
    )


def _model_schema(model: str, config: str | os.PathLike | None) -> str | None:
    """``local-dir``, ``hf-hub`` or None (an open_clip architecture, registered from ``config`` if given)."""
    if config is not None:
        registered = register_architecture(config)
        if registered != model:
            raise ConfigError(
                f"model config {config} defines architecture {registered!r} (its file name) "
                f"but the model name is {model!r}; use model: {registered}"
            )
    schema = "local-dir" if model.startswith("local-dir:") else "hf-hub" if model.startswith("hf-hub:") else None
    if schema is None and model not in open_clip.list_models():
        raise ConfigError(
            f"unknown model {model!r}: not an open_clip architecture. Use a name from "
            "open_clip.list_models() (e.g. ViT-B-32), 'hf-hub:org/repo', 'local-dir:/path', or "
            "give a custom architecture with config: path/to/Name.json"
        )
    return schema


def _local_weights(model: str, pretrained: str | None, schema: str | None) -> Path | None:
    """The local file to read the weights from (bundled, a ``local-dir:`` folder's, or a path), or None."""
    local_weights = bundled_weights(model, pretrained) if schema is None else None
    if schema == "local-dir":
        local_weights = _local_dir_weights(Path(model.removeprefix("local-dir:")))
    elif local_weights is None and schema is None and pretrained and _looks_like_path(pretrained):
        local_weights = Path(pretrained)
        if not local_weights.is_file():
            raise WeightsUnavailableError(f"weights file {local_weights} for model {model!r} does not exist")
    return local_weights


def _build_architecture(
    model: str,
    pretrained: str | None,
    schema: str | None,
    local_weights: Path | None,
    device: str | torch.device,
    quick_gelu: bool,
) -> nn.Module:
    """The open_clip model: with downloaded (or cached) weights, or bare when they are local or absent."""
    try:
        if local_weights is not None or (schema is None and not pretrained):
            # Build the architecture only; load_clip reads local weights safely. (open_clip
            # would warn that the model is "initialized randomly".)
            with _quiet_open_clip():
                clip = open_clip.create_model(model, load_weights=False, device=device, force_quick_gelu=quick_gelu)
        else:
            clip = _create_with_downloaded_weights(model, pretrained if schema is None else None, device, quick_gelu)
    except (RuntimeError, OSError, ValueError) as err:
        if schema == "local-dir":
            raise CheckpointError(f"cannot build {model!r}: {err}") from err
        tags = open_clip.list_pretrained_tags_by_model(model) if schema is None else []
        raise WeightsUnavailableError(
            f"cannot get weights for model {model!r} (pretrained={pretrained!r}): {_first_line(err)}\n"
            "They are not in the local cache and cannot be downloaded here. Provide them locally: "
            "on a machine with network, open_clip.create_model(name, pretrained=tag) caches them "
            "under ~/.cache/huggingface (copy that folder here, or set HF_HOME), or pass "
            "pretrained: /path/to/weights.safetensors, or model: local-dir:/path/to/folder "
            "(open_clip_config.json + open_clip_model.safetensors)."
            + (f" Known tags for {model}: {', '.join(tags)}" if tags else "")
        ) from None
    return clip


@contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def resolve_quick_gelu(model: str, pretrained: str | None) -> bool:
    """Whether ``load_clip(model, pretrained)`` builds QuickGELU towers (open_clip's
    ``force_quick_gelu``): yes for a tag open_clip's registry records as trained with QuickGELU
    (``ViT-B-32`` + ``openai``), whatever the architecture's default, since open_clip 3 would
    build GELU and only warn.

    A ``-quickgelu`` architecture with weights trained with GELU is a ConfigError. (The one pair
    of open_clip's own registry that disagrees, ``roberta-ViT-B-32`` + ``laion2b_s12b_b32k``,
    has no GELU variant to point to; its architecture's setting is kept.) Without a tag (random
    weights, a weights file, bundled weights) the architecture's setting stands: a file of
    OpenAI's weights needs ``model: ViT-B-32-quickgelu``.
    """
    if not pretrained:
        return False
    tag = open_clip.get_pretrained_cfg(model, pretrained)
    gelu_variant = model.removesuffix("-quickgelu") if model.endswith("-quickgelu") else None
    if not tag and gelu_variant:
        # open_clip lists only QuickGELU tags under -quickgelu names: a GELU tag is under the plain name.
        gelu_tag = open_clip.get_pretrained_cfg(gelu_variant, pretrained)
        if gelu_tag and not gelu_tag.get("quick_gelu", False):
            raise ConfigError(
                f"model {model!r} uses QuickGELU but the {pretrained!r} weights were trained with GELU; "
                f"use model: {gelu_variant}"
            )
    return bool(tag.get("quick_gelu", False))


def _create_with_downloaded_weights(model: str, pretrained: str | None, device, quick_gelu: bool = False) -> nn.Module:
    """Create a model whose weights come from a hub or URL: the local cache first, then the
    network only if it answers within seconds (so an offline machine fails fast)."""
    import huggingface_hub.constants as hub

    if pretrained and not open_clip.get_pretrained_cfg(model, pretrained):
        raise ValueError(f"{pretrained!r} is neither a known pretrained tag nor an existing file")
    create = {"pretrained": pretrained, "device": device, "require_pretrained": True, "force_quick_gelu": quick_gelu}
    offline = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        return open_clip.create_model(model, **create)
    except (RuntimeError, OSError, ValueError) as err:
        cache_error = err
    finally:
        hub.HF_HUB_OFFLINE = offline
    host = _weights_host(model, pretrained)
    if offline or not _reachable(host):
        raise RuntimeError(f"not in the local cache and {host} is not reachable ({_first_line(cache_error)})")
    return open_clip.create_model(model, **create)


def _weights_host(model: str, pretrained: str | None) -> str:
    import huggingface_hub.constants as hub

    cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    url = cfg.get("url") if cfg and not cfg.get("hf_hub") else hub.ENDPOINT
    return urlparse(url).hostname or "huggingface.co"


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def weights_fingerprint(model: str, pretrained: str | None) -> str:
    """Identifies the weights ``load_clip(model, pretrained)`` loads: a content hash for local
    files, the name and tag otherwise (marked when QuickGELU is forced onto a GELU architecture,
    so experts fine-tuned before that fix, with GELU, no longer match)."""
    path = bundled_weights(model, pretrained) or (
        Path(pretrained) if pretrained and _looks_like_path(pretrained) else None
    )
    if path is None or not path.is_file():
        architecture = open_clip.get_model_config(model) or {}
        forced = resolve_quick_gelu(model, pretrained) and not architecture.get("quick_gelu", False)
        return f"{model}:{pretrained}" + ("+quickgelu" if forced else "")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_weights(model: str, pretrained: str | None) -> Path | None:
    """Weights shipped with safemerge: ``pretrained: mini`` for the mini benchmark's CLIP."""
    if not pretrained or os.sep in pretrained:
        return None
    path = BUNDLED_WEIGHTS / f"{model}.{pretrained}.safetensors"
    return path if path.is_file() else None


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES) or Path(pretrained).exists()


def _local_dir_weights(folder: Path) -> Path:
    if not (folder / "open_clip_config.json").is_file():
        raise WeightsUnavailableError(
            f"local-dir:{folder} needs open_clip_config.json (with model_cfg) and a weights file"
        )
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return folder / found[0]
    raise WeightsUnavailableError(
        f"local-dir:{folder} has no weights file (expected open_clip_model.safetensors); found {found}"
    )


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
