"""Model loading and the zero-shot classifier, against direct open_clip computations."""

import json
import time
from functools import partial

import open_clip
import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from safemerge.errors import ConfigError, WeightsUnavailableError
from safemerge.io import save_tensors
from safemerge.models import ImageClassifier, cached_zero_shot_head, load_clip, zero_shot_head

TINY = "TinyCLIP-ViT-32"
CLASSNAMES = ["zero", "one", "two"]
TEMPLATES = ["a photo of the number {}.", "a drawing of {}.", "{}, handwritten."]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY, None)


def _prompts():
    return [[t.format(c) for t in TEMPLATES] for c in CLASSNAMES]


def test_zero_shot_logits_match_open_clip(clip):
    head = zero_shot_head(clip, CLASSNAMES, _prompts())
    # open_clip's own recipe: class embedding [D, C] from the same templates, then
    # logit_scale * normalized image features @ classifier, on normalised pixels.
    reference = build_zero_shot_classifier(
        clip.model,
        partial(clip.tokenizer, context_length=clip.context_length),
        CLASSNAMES,
        [t.format for t in TEMPLATES],
        num_classes_per_batch=2,
    )
    pixels = torch.rand(4, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    with torch.no_grad():
        features = clip.model.encode_image((pixels - mean) / std, normalize=True)
        expected = clip.model.logit_scale.exp() * features @ reference
        classifier = ImageClassifier(clip.visual, {"numbers": head}, clip.mean, clip.std)
        actual = classifier(pixels, "numbers")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_head_cache_is_reused_and_keyed_by_prompts(clip, monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path))
    first = cached_zero_shot_head(clip, "numbers", CLASSNAMES, _prompts())
    assert len(list((tmp_path / "heads").iterdir())) == 1
    calls = []
    monkeypatch.setattr("safemerge.models.heads.zero_shot_head", lambda *a: calls.append(a))
    again = cached_zero_shot_head(clip, "numbers", CLASSNAMES, _prompts())
    assert not calls and torch.equal(first, again)
    monkeypatch.undo()
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path))
    cached_zero_shot_head(clip, "numbers", CLASSNAMES, [[p + "!" for p in c] for c in _prompts()])
    assert len(list((tmp_path / "heads").iterdir())) == 2


def test_local_weights_file_and_local_dir_load_the_same_model(clip, tmp_path):
    state = clip.model.state_dict()
    save_tensors(tmp_path / "tiny.safetensors", state)
    from_file = load_clip(TINY, str(tmp_path / "tiny.safetensors"))
    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    config = open_clip.get_model_config(TINY)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_tensors(folder / "open_clip_model.safetensors", state)
    from_dir = load_clip(f"local-dir:{folder}")
    for loaded in (from_file, from_dir):
        for name, tensor in loaded.model.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def test_custom_architecture_from_json(tmp_path):
    config = open_clip.get_model_config(TINY)
    config["vision_cfg"]["layers"] = 1
    path = tmp_path / "OneLayer-ViT.json"
    path.write_text(json.dumps(config))
    loaded = load_clip("OneLayer-ViT", None, config=path)
    assert len(loaded.visual.transformer.resblocks) == 1 and loaded.image_size == 32


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'ViT-Q-99'.*open_clip.list_models"):
        load_clip("ViT-Q-99", None)


def test_unavailable_weights_fail_fast_with_instructions():
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="(?s)ViT-B-32.*openai.*locally.*pretrained: /path"):
        load_clip("ViT-B-32", "openai")
    assert time.monotonic() - start < 10


# Weights that do not fit, or would run code: tests/test_hostile_checkpoints.py


def test_zero_shot_heads_of_the_same_text_weights_under_another_activation_do_not_share_a_cache_key():
    """A head cached for a GELU text tower must not be served to the QuickGELU tower with the same weights."""
    from types import SimpleNamespace

    import open_clip

    from safemerge.models.heads import text_fingerprint

    gelu = open_clip.create_model("TinyCLIP-ViT-32")
    quick = open_clip.create_model("TinyCLIP-ViT-32", force_quick_gelu=True)
    quick.load_state_dict(gelu.state_dict())
    again = open_clip.create_model("TinyCLIP-ViT-32")
    again.load_state_dict(gelu.state_dict())
    assert text_fingerprint(SimpleNamespace(model=gelu)) == text_fingerprint(SimpleNamespace(model=again))
    assert text_fingerprint(SimpleNamespace(model=gelu)) != text_fingerprint(SimpleNamespace(model=quick))
