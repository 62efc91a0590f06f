"""Hugging Face CLIP in and out (``python -m safemerge.convert hf-base / hf-expert / to-hf``), pinned
against transformers' own forward on random small CLIPs that transformers builds here.

Acceptance: a base and experts saved by transformers (both key layouts), converted, merged by task
arithmetic through safemerge.merging and exported, equal the task arithmetic of the HF vision
state dicts; features equal transformers' ``get_image_features`` / ``get_text_features``.
"""

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safemerge.convert.__main__ import main
from safemerge.data.registry import get_task, task_names
from safemerge.io import Expert, expert_info, read_expert, write_expert
from safemerge.merging import task_arithmetic
from safemerge.models import load_clip

transformers = pytest.importorskip("transformers")

# (vision width, heads, patch, image size, layers, activation, expert layout)
CONFIGS = {
    "w32-h2-p8-quickgelu-v5": (32, 2, 8, 32, 2, "quick_gelu", "v5"),
    "w48-h3-p16-gelu-v4": (48, 3, 16, 32, 1, "gelu", "v4"),
    "w64-h4-p4-quickgelu-v4": (64, 4, 4, 16, 2, "quick_gelu", "v4"),
}
TASKS = ("mnist", "svhn", "gtsrb")
PROMPTS = ["a photo of a cat.", 'a photo of the number: "7".', "a centered satellite photo of forest."]


def _hf_vocab(directory: Path) -> None:
    """vocab.json / merges.txt in HF's format, made from open_clip's bundled BPE (no download)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab = dict(SimpleTokenizer().encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _clip_config(width, heads, patch, image, layers, act):
    return transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act=act
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image,
            patch_size=patch,
            hidden_act=act,
        ),
        projection_dim=24,
    )


def _features(output):
    """transformers 5 returns an output object from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module", params=CONFIGS.values(), ids=CONFIGS.keys())
def hf_pool(request, tmp_path_factory):
    """A random CLIPModel (base) and three CLIPVisionModel experts perturbed from it, saved by transformers."""
    width, heads, patch, image, layers, act, layout = request.param
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.CLIPModel(_clip_config(width, heads, patch, image, layers, act)).eval()
    with torch.no_grad():  # transformers initialises norms to 1/0 and the logit scale to a constant: vary them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp / "base_hf")
    _hf_vocab(tmp / "base_hf")
    experts = []
    for i, task in enumerate(TASKS):
        vision = transformers.CLIPVisionModel(model.config.vision_config).eval()
        state = {
            k.removeprefix("vision_model."): v + 0.01 * (i + 1) * torch.randn_like(v)
            for k, v in model.vision_model.state_dict().items()
        }
        vision.vision_model.load_state_dict(state) if hasattr(vision, "vision_model") else vision.load_state_dict(state)
        directory = tmp / f"expert_hf_{task}"
        vision.save_pretrained(directory)
        if layout == "v4":  # transformers 4.x files put the tower under vision_model.
            save_file(
                {f"vision_model.{k}": v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors")
            )
        experts.append((task, directory, state))
    assert main(["hf-base", str(tmp / "base_hf"), str(tmp / "base")]) == 0
    return tmp, model, experts, layout


def test_converted_base_gives_transformers_image_and_text_features(hf_pool):
    tmp, model, _, _ = hf_pool
    clip = load_clip(f"local-dir:{tmp / 'base'}")
    image = model.config.vision_config.image_size
    x = torch.randn(3, 3, image, image)
    tokens = clip.tokenizer(PROMPTS, context_length=clip.context_length)
    with torch.no_grad():
        ours_image, ours_text = clip.model.encode_image(x), clip.model.encode_text(tokens)
        theirs_image = _features(model.get_image_features(pixel_values=x))
        theirs_text = _features(model.get_text_features(input_ids=tokens))
    torch.testing.assert_close(ours_image, theirs_image, atol=1e-5 * theirs_image.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(ours_text, theirs_text, atol=1e-5 * theirs_text.abs().max().item(), rtol=1e-5)
    assert torch.equal(clip.model.logit_scale, model.logit_scale)
    quick = model.config.vision_config.hidden_act == "quick_gelu"
    assert type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == ("QuickGELU" if quick else "GELU")


def test_hf_experts_merged_by_task_arithmetic_export_as_the_task_arithmetic_of_the_hf_weights(hf_pool):
    tmp, model, experts, _ = hf_pool
    directories = []
    for task, source, _ in experts:
        assert main(["hf-expert", str(source), str(tmp / task), "--base", str(tmp / "base"), "--task", task]) == 0
        directories.append(read_expert(tmp / task))
    assert directories[0].info["model"] == f"local-dir:{(tmp / 'base').resolve()}"
    assert directories[0].info["num_classes"] == get_task(TASKS[0]).num_classes
    clip = load_clip(directories[0].info["model"])
    merged = task_arithmetic(clip.visual.state_dict(), [e.encoder for e in directories], 0.3)
    info = expert_info(
        model=directories[0].info["model"],
        pretrained=None,
        task="+".join(TASKS),
        num_classes=sum(get_task(t).num_classes for t in TASKS),
        backdoor=None,
        metrics={"accuracy": None, "asr": None},
        tasks=list(TASKS),
        method="task_arithmetic",
    )
    write_expert(tmp / "merged", Expert(encoder=merged, info=info))
    assert main(["to-hf", str(tmp / "merged"), str(tmp / "merged_hf")]) == 0

    exported = transformers.CLIPVisionModel.from_pretrained(tmp / "merged_hf", local_files_only=True).eval()
    base = {k.removeprefix("vision_model."): v for k, v in model.vision_model.state_dict().items()}
    expected = {k: v + 0.3 * sum(state[k] - v for _, _, state in experts) for k, v in base.items()}
    got = {k.removeprefix("vision_model."): v for k, v in exported.state_dict().items()}
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=1e-6, msg=name)

    # the exported tower is safemerge's tower before its projection
    image = model.config.vision_config.image_size
    x = torch.randn(2, 3, image, image)
    clip.visual.load_state_dict(merged)
    with torch.no_grad():
        ours = clip.visual(x)
        theirs = exported(pixel_values=x).pooler_output @ merged["proj"]
    torch.testing.assert_close(ours, theirs, atol=1e-5 * ours.abs().max().item(), rtol=1e-5)

    # --full: a CLIPModel whose image features are the merged encode_image, text features the base's
    assert main(["to-hf", str(tmp / "merged"), str(tmp / "merged_full"), "--full"]) == 0
    full = transformers.CLIPModel.from_pretrained(tmp / "merged_full", local_files_only=True).eval()
    tokens = clip.tokenizer(PROMPTS, context_length=clip.context_length)
    with torch.no_grad():
        torch.testing.assert_close(
            _features(full.get_image_features(pixel_values=x)), ours, atol=1e-5 * ours.abs().max().item(), rtol=1e-5
        )
        text = _features(model.get_text_features(input_ids=tokens))
        torch.testing.assert_close(_features(full.get_text_features(input_ids=tokens)), text, atol=1e-6, rtol=1e-6)
    assert (tmp / "merged_full" / "vocab.json").is_file()  # the base's tokenizer travels with it


def test_hf_expert_with_another_patch_size_is_one_error_line_and_writes_nothing(hf_pool, tmp_path, capsys):
    tmp, model, _, _ = hf_pool
    config = model.config.vision_config.to_dict()
    config["patch_size"] = config["patch_size"] // 2
    other = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**config))
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["hf-expert", str(tmp_path / "other"), str(out), "--base", str(tmp / "base"), "--task", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "patch_size" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hf_tokenizer_and_open_clip_give_the_same_ids_on_every_task_prompt(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    _hf_vocab(tmp_path)
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = SimpleTokenizer()
    prompts = sorted({p for name in task_names() for c in get_task(name).classnames for p in get_task(name).prompts(c)})
    assert len(prompts) > 1000
    theirs = hf(prompts)["input_ids"]
    mismatched = [
        (p, ids, [ours.sot_token_id, *ours.encode(p), ours.eot_token_id])
        for p, ids in zip(prompts, theirs)
        if ids != [ours.sot_token_id, *ours.encode(p), ours.eot_token_id]
    ]
    assert not mismatched, mismatched[:3]


def test_a_base_with_another_vocabulary_is_refused(tmp_path, hf_pool, capsys):
    tmp, _, _, _ = hf_pool
    import shutil

    shutil.copytree(tmp / "base_hf", tmp_path / "src")
    vocab = json.loads((tmp_path / "src" / "vocab.json").read_text())
    vocab["hello</w>"], vocab["world</w>"] = vocab["world</w>"], vocab["hello</w>"]
    (tmp_path / "src" / "vocab.json").write_text(json.dumps(vocab))
    assert main(["hf-base", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "not CLIP's BPE vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
