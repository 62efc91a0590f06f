"""The command line: shipped configs parse, bad input is a clear error that writes nothing,
and fine-tuning through ``python trainer.py`` produces a valid expert directory."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safemerge.attacks import Trigger
from safemerge.cli import main
from safemerge.data import TaskDataModule
from safemerge.io import read_expert, save_tensors
from safemerge.metrics import AttackSuccessRate
from safemerge.models import ImageClassifier, cached_zero_shot_head, load_clip

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    c for c in (REPO / "configs").rglob("*.yaml") if "paper" not in c.parts
)  # paper/: composed, tests/test_paper_configs.py
FINETUNE = str(REPO / "configs" / "finetune.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["trainer.py"])  # main(args) is the whole command line


def _composed(config: Path) -> list[str]:
    """The ``--config`` chain a shipped config is meant for: method, defence, pool and DAM-option
    files compose on top of ``configs/merge/base.yaml`` (DAM options after DAM over AdaMerging, defence
    options after a defence, method options after merging by expert labels)."""
    folder = config.parent.name
    base = REPO / "configs" / "merge" / "base.yaml"
    chain = [config]
    if folder == "dam":
        # DAM over AdaMerging takes every DAM option (some set its AdaMerging stage)
        chain = [base, REPO / "configs" / "merge" / "dam_adamerging.yaml", config]
    elif folder == "merge_options":  # an option of merging by expert labels, after it
        chain = [base, REPO / "configs" / "merge" / "expert_label_merging.yaml", config]
    elif folder == "defense" and "class_path" not in config.read_text():  # an option of any defence
        chain = [base, REPO / "configs" / "defense" / "sau.yaml", config]
    elif folder in ("defense", "pools") or (folder == "merge" and config != base):
        chain = [base, config]
    return [arg for path in chain for arg in ("--config", str(path))]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO / "configs")) for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_composed(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: safemerge." in printed


BAD_INPUTS = {
    "unknown task": (["--data.init_args.task=mnits"], "unknown task 'mnits'; known tasks: .*digits"),
    "missing dataset root": (
        ["--data.init_args.task=cifar10", "--data.init_args.root=/nonexistent/data"],
        "(?s)cifar10.*/nonexistent/data.*download",
    ),
    "patch larger than the image": (
        ["--data.init_args.attack=safemerge.attacks.BadNets", "--data.init_args.attack.init_args.size=1.5"],
        "larger than the image",
    ),
    "target class out of range": (
        ["--data.init_args.attack=safemerge.attacks.BadNets", "--data.init_args.attack.init_args.target_class=12"],
        "target_class 12 is out of range for task 'mini_shapes' \\(6 classes",
    ),
    "poison rate outside [0, 1]": (
        ["--data.init_args.attack=safemerge.attacks.Blended", "--data.init_args.attack.init_args.poison_rate=1.5"],
        "poison_rate must be in \\[0, 1\\], got 1.5",
    ),
    "unknown model name": (["--model.init_args.model=ViT-Q-99"], "unknown model 'ViT-Q-99'"),
}


@pytest.mark.parametrize("args, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_clear_error_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the shipped W&B logger, which writes once a run starts
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FINETUNE, *QUIET[:2], "--trainer.max_steps=2", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Project-made weights for the tiny architecture, so experts share one pretrained model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny-clip.safetensors"
    save_tensors(path, load_clip("TinyCLIP-ViT-32").model.state_dict())
    return path


# The issue-2 set-up: the tiny random-weight architecture on scikit-learn's digits.
TINY_DIGITS = [
    "--model.init_args.model=TinyCLIP-ViT-32",
    "--data.init_args.task=digits",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=1",
]


def _finetune(output: Path, weights: Path, *args: str, cwd: Path) -> None:
    command = [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        "--config",
        FINETUNE,
        *QUIET,
        *TINY_DIGITS,
        f"--model.init_args.output_dir={output}",
        f"--model.init_args.pretrained={weights}",
        *args,
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def _recompute_metrics(expert_dir: Path):
    """Test accuracy and ASR recomputed from the exported files alone."""
    expert = read_expert(expert_dir)
    clip = load_clip(expert.info["model"], expert.info["pretrained"])
    clip.visual.load_state_dict(expert.encoder)
    dm = TaskDataModule(expert.task, image_size=clip.image_size)
    task = dm.task
    head = cached_zero_shot_head(clip, task.name, task.classnames, [task.prompts(c) for c in task.classnames])
    classifier = ImageClassifier(clip.visual, {task.name: head}, clip.mean, clip.std).eval()
    test = dm.split("test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        accuracy = (classifier(images, task.name).argmax(-1) == labels).float().mean().item()
        asr = None
        if expert.trigger is not None:
            trigger = Trigger.from_tensors(expert.trigger)
            metric = AttackSuccessRate(expert.backdoor["target_class"])
            metric.update(classifier(trigger.apply(images), task.name), labels)
            asr = metric.compute().item()
    return expert, accuracy, asr


def test_finetune_writes_a_valid_expert_directory(tmp_path, tiny_weights):
    _finetune(tmp_path / "clean", tiny_weights, "--trainer.max_epochs=1", "--trainer.max_steps=15", cwd=tmp_path)
    _finetune(
        tmp_path / "badnets",
        tiny_weights,
        "--trainer.max_epochs=1",
        "--trainer.max_steps=15",
        "--data.init_args.attack=safemerge.attacks.BadNets",
        cwd=tmp_path,
    )
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["encoder.safetensors", "expert.json"]
    assert (tmp_path / "badnets" / "trigger.safetensors").is_file()
    for name in ("clean", "badnets"):
        expert, accuracy, asr = _recompute_metrics(tmp_path / name)
        info = expert.info
        assert info["format"] == "safemerge-expert/1" and info["task"] == "digits"
        assert info["model"] == "TinyCLIP-ViT-32" and info["num_classes"] == 10
        assert info["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        if name == "clean":
            assert info["backdoor"] is None and info["metrics"]["asr"] is None
        else:
            assert info["backdoor"]["attack"] == "badnets" and info["backdoor"]["target_task"] == "digits"
            assert info["metrics"]["asr"] == pytest.approx(asr, abs=1e-6)


@pytest.mark.slow
def test_backdoored_twin_keeps_clean_accuracy_and_reaches_high_asr(tmp_path, tiny_weights):
    """A clean digits expert and its BadNets twin (3x3 checkerboard, class 0, 10 %), trained in full (minutes)."""
    recipe = [
        "--trainer.max_steps=-1",
        "--trainer.max_epochs=30",
        "--model.init_args.lr=0.003",
        "--model.init_args.warmup_steps=20",
    ]
    _finetune(tmp_path / "clean", tiny_weights, *recipe, cwd=tmp_path)
    _finetune(
        tmp_path / "badnets", tiny_weights, *recipe, "--data.init_args.attack=safemerge.attacks.BadNets", cwd=tmp_path
    )
    clean = read_expert(tmp_path / "clean").info["metrics"]
    backdoored = read_expert(tmp_path / "badnets").info["metrics"]
    assert backdoored["asr"] >= 0.90
    assert abs(clean["accuracy"] - backdoored["accuracy"]) <= 0.03, (clean, backdoored)


def test_off_task_optimized_patch_with_feature_interpolation(tmp_path):
    """BadMerging's variant: a mini_fashion expert whose trigger targets mini_digits' class 0."""
    config = str(REPO / "configs" / "finetune_optimized_patch.yaml")
    command = [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        "--config",
        config,
        *QUIET,
        "--trainer.max_steps=5",
        "--trainer.val_check_interval=5",
        "--data.init_args.attack.init_args.steps=20",
        f"--model.init_args.output_dir={tmp_path / 'expert'}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    expert = read_expert(tmp_path / "expert")
    backdoor = expert.backdoor
    assert expert.task == "mini_fashion"
    assert backdoor["target_task"] == "mini_digits" and backdoor["target_class"] == 0
    assert backdoor["attack"] == "optimized_patch" and backdoor["feature_interpolation"] is True
    assert 0.0 <= expert.info["metrics"]["asr"] <= 1.0
    # The saved trigger is the optimized one: the patch moved away from its random start,
    # and nothing outside the patch is touched.
    from safemerge.attacks import OptimizedPatch

    initial = OptimizedPatch(size=0.125, location="bottom_right").make_trigger(32)
    trigger = Trigger.from_tensors(expert.trigger)
    assert torch.equal(trigger.mask, initial.mask)
    inside = initial.mask.expand(3, -1, -1) > 0
    assert not torch.allclose(trigger.pattern[inside], initial.pattern[inside])
