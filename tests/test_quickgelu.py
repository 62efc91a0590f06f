"""QuickGELU follows the weights: the activation ``load_clip`` builds for a tag is the one open_clip's
registry says the weights were trained with, an architecture that contradicts its weights is a
one-line error, and the mini model keeps the GELU it was trained with.

No weights are downloaded: for pretrained tags, open_clip's ``create_model`` is replaced by the
same call with ``load_weights=False`` on the meta device, so what is checked is the module class
built in each tower's MLP by ``load_clip``'s own code path.
"""

import hashlib
import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from open_clip.transformer import QuickGELU
from torch import nn

from safemerge.errors import ConfigError
from safemerge.io import save_tensors
from safemerge.models import load_clip
from safemerge.models.loading import ARCHITECTURES, BUNDLED_WEIGHTS, resolve_quick_gelu, weights_fingerprint

REPO = Path(__file__).resolve().parents[1]


def activations(model: nn.Module) -> set[type]:
    """The activation classes of every transformer MLP of both towers."""
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    assert blocks
    return {type(block.mlp.gelu) for block in blocks}


@pytest.fixture
def no_download(monkeypatch):
    """open_clip.create_model without weights, on the meta device; records each call's arguments."""
    real = open_clip.create_model
    calls = []

    def create_model(name, pretrained=None, *, device="cpu", force_quick_gelu=False, **kwargs):
        calls.append({"name": name, "pretrained": pretrained, "force_quick_gelu": force_quick_gelu, **kwargs})
        with torch.device("meta"):  # parameters are never materialised: instant even for ViT-L-14
            return real(name, load_weights=False, device="meta", force_quick_gelu=force_quick_gelu)

    monkeypatch.setattr(open_clip, "create_model", create_model)
    return calls


@pytest.mark.parametrize("model", ["ViT-B-32", "ViT-L-14"])
def test_openai_weights_get_quickgelu_towers(model, no_download):
    clip = load_clip(model, "openai")
    assert no_download[-1]["pretrained"] == "openai"  # the path that loads the tag's weights
    assert activations(clip.model) == {QuickGELU}
    assert clip.name == model and clip.pretrained == "openai"  # records keep the name the user gave


def test_quickgelu_architecture_name_with_openai_weights(no_download):
    assert activations(load_clip("ViT-B-32-quickgelu", "openai").model) == {QuickGELU}


@pytest.mark.parametrize("model, tag", [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-L-14", "datacomp_xl_s13b_b90k")])
def test_gelu_weights_get_gelu_towers(model, tag, no_download):
    assert activations(load_clip(model, tag).model) == {nn.GELU}


def test_quickgelu_architecture_with_gelu_weights_is_an_error(no_download):
    with pytest.raises(ConfigError, match=r"QuickGELU.*'laion2b_s34b_b79k'.*GELU.*use model: ViT-B-32$"):
        load_clip("ViT-B-32-quickgelu", "laion2b_s34b_b79k")
    assert no_download == []  # refused before anything is built or fetched


def test_the_registry_decides_not_the_tag_name():
    """A laion tag trained with QuickGELU (open_clip names its file 'quickgelu') gets it; OpenAI's
    RN50 too; random weights keep the architecture's default."""
    assert resolve_quick_gelu("ViT-B-32", "laion400m_e32") is True
    assert resolve_quick_gelu("RN50", "openai") is True
    assert resolve_quick_gelu("ViT-B-32", None) is False


def test_every_config_with_openai_weights_resolves_to_quickgelu():
    """Every model/pretrained pair in configs/ (fine-tuning files): OpenAI's weights mean QuickGELU."""
    pairs = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        init = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
        if init.get("pretrained") == "openai":
            pairs.append((path.relative_to(REPO).as_posix(), init.get("model", "ViT-B-32")))  # FinetuneModule's default
    assert {"configs/paper/models/ViT-B-32.yaml", "configs/paper/models/ViT-L-14.yaml"} <= {p for p, _ in pairs}
    for path, model in pairs:
        assert resolve_quick_gelu(model, "openai"), path


def _local_dir(folder: Path, quick_gelu: bool | None) -> Path:
    """A local-dir: model (MiniCLIP-ViT's architecture, random weights) whose config sets quick_gelu."""
    model_cfg = json.loads((ARCHITECTURES / "MiniCLIP-ViT.json").read_text())
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_tensors(folder / "open_clip_model.safetensors", open_clip.create_model("MiniCLIP-ViT").state_dict())
    return folder


@pytest.mark.parametrize("quick_gelu, expected", [(True, QuickGELU), (False, nn.GELU), (None, nn.GELU)])
def test_local_dir_builds_the_activation_its_config_names(quick_gelu, expected, tmp_path):
    folder = _local_dir(tmp_path / "model", quick_gelu)
    assert activations(load_clip(f"local-dir:{folder}").model) == {expected}


def test_mini_model_keeps_gelu():
    """The mini model was trained with GELU (its bundled architecture sets no quick_gelu)."""
    assert "quick_gelu" not in json.loads((ARCHITECTURES / "MiniCLIP-ViT.json").read_text())
    clip = load_clip("MiniCLIP-ViT", "mini2")
    assert activations(clip.model) == {nn.GELU}
    bundled = (BUNDLED_WEIGHTS / "MiniCLIP-ViT.mini2.safetensors").read_bytes()
    assert weights_fingerprint("MiniCLIP-ViT", "mini2") == hashlib.sha256(bundled).hexdigest()  # expert keys unchanged


def test_expert_keys_of_openai_experts_say_quickgelu():
    """Experts fine-tuned from OpenAI's weights before QuickGELU was forced (with GELU) must not be
    taken for the new ones: their weights' identity changes; GELU tags keep theirs."""
    assert weights_fingerprint("ViT-B-32", "openai") != weights_fingerprint("ViT-B-32", "laion2b_s34b_b79k")
    assert weights_fingerprint("ViT-B-32", "openai") == "ViT-B-32:openai+quickgelu"
    assert weights_fingerprint("ViT-B-32-quickgelu", "openai") == "ViT-B-32-quickgelu:openai"
    assert weights_fingerprint("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32:laion2b_s34b_b79k"
