"""The bundled mini benchmark: the committed tiny CLIP, pretraining through the CLI, and the
pool of experts (the expert cache itself: tests/test_expert_cache.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from safemerge.data import get_task
from safemerge.data.mini_v1_tasks import mini_task_names
from safemerge.data.mini_v2 import domain_task_names
from safemerge.errors import ConfigError
from safemerge.evaluation import classifier_for, evaluate
from safemerge.experts import MINI_BACKDOORS, MINI_MODEL, MINI_WEIGHTS, mini_backdoor, mini_pool, resolve_expert
from safemerge.models import load_clip

REPO = Path(__file__).resolve().parents[1]

# Zero-shot test accuracy of the committed MiniCLIP-ViT ("mini") must clear these floors
# (measured values are in the README; chance is 1/classes).
ZERO_SHOT_FLOORS = {
    "mini_shape": 0.20,
    "mini_color": 0.50,
    "mini_count": 0.40,
    "mini_digit": 0.30,
    "mini_texture": 0.50,
}


def test_committed_mini_clip_loads_and_classifies_zero_shot():
    clip = load_clip("MiniCLIP-ViT", "mini")
    weights = Path(REPO / "safemerge/models/pretrained/MiniCLIP-ViT.mini.safetensors")
    assert weights.stat().st_size <= 15 * 2**20
    tasks = [get_task(name) for name in mini_task_names()]
    results = evaluate(classifier_for(clip, tasks), tasks, image_size=clip.image_size)
    for task in tasks:
        accuracy = results[task.name]["accuracy"]
        assert accuracy >= ZERO_SHOT_FLOORS[task.name] > 1 / task.num_classes, (task.name, accuracy)


def test_committed_mini2_clip_is_zero_shot_above_chance_and_below_75_percent_on_every_v2_task():
    """The acceptance band of mini benchmark v2: every task at least 10 points above chance and
    at most 75 % zero-shot (test split), so experts have something to learn."""
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    weights = REPO / "safemerge/models/pretrained"
    assert sum(f.stat().st_size for f in weights.glob("*.safetensors")) <= 20 * 2**20
    tasks = [get_task(name) for name in domain_task_names()]
    results = evaluate(classifier_for(clip, tasks), tasks, image_size=clip.image_size)
    for task in tasks:
        accuracy = results[task.name]["accuracy"]
        assert 1 / task.num_classes + 0.10 <= accuracy <= 0.75, (task.name, accuracy)


def test_the_default_pool_has_one_expert_per_v2_task_and_the_three_attacks():
    pool = mini_pool()
    assert [spec.task for spec in pool] == domain_task_names()
    attacks = {spec.task: spec.attack for spec in pool if spec.attack}
    assert attacks == MINI_BACKDOORS
    kinds = {
        (
            a["class_path"].rsplit(".", 1)[-1],
            a["init_args"].get("target_task"),
            bool(a["init_args"].get("feature_interpolation")),
        )
        for a in attacks.values()
    }
    assert kinds == {("OptimizedPatch", None, True), ("OptimizedPatch", "mini_digits", True), ("BadNets", None, False)}
    assert all(spec.attack is None for spec in mini_pool(backdoored=False))
    with pytest.raises(
        ConfigError,
        match="no .backdoored. expert for mini_shapes; backdoored ones for mini_shapes: mini:mini_shapes:blended",
    ):
        resolve_expert("mini:mini_shapes:backdoored")
    with pytest.raises(ConfigError, match="unknown mini expert 'mini:mini_shape'"):
        resolve_expert("mini:mini_shape")  # v1 tasks are not in the pool


def test_held_out_pools_use_other_attacks_tasks_and_targets_than_the_dev_pool():
    import yaml

    def attacks(pool_file):
        experts = yaml.safe_load((REPO / "configs/pools" / pool_file).read_text())["model"]["init_args"]["experts"]
        assert [e.split(":")[1] for e in experts] == domain_task_names()
        return {e.split(":")[1]: mini_backdoor(e.split(":")[1], e.split(":")[2]) for e in experts if e.count(":") == 2}

    dev = attacks("mini_default.yaml")
    assert dev == MINI_BACKDOORS
    held_out = [attacks(f.name) for f in sorted((REPO / "configs/pools").glob("mini_heldout_*.yaml"))]
    assert len(held_out) == 7 and sorted(len(pool) for pool in held_out) == [1, 1, 1, 1, 1, 2, 2]
    dev_targets = {
        (a["init_args"].get("target_task") or task, a["init_args"]["target_class"]) for task, a in dev.items()
    }
    for pool in held_out:
        for task, attack in pool.items():
            assert task not in dev or attack != dev[task]
            assert (
                attack["init_args"].get("target_task") or task,
                attack["init_args"]["target_class"],
            ) not in dev_targets
    kinds = {a["class_path"].rsplit(".", 1)[-1] for pool in held_out for a in pool.values()}
    assert kinds == {"Blended", "OptimizedPatch", "BadNets", "WaNet", "SIG"}


@pytest.mark.parametrize("config", ["pretrain.yaml", "pretrain_v2.yaml"])
def test_pretraining_runs_through_the_cli(tmp_path, config):
    from safemerge.data import mini_assets

    if config == "pretrain_v2.yaml" and not (mini_assets.FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        # v2's captions draw Fashion-MNIST items beyond the subset the package ships (README: pretraining
        # needs the full files); a machine made only by `pip install -r requirements.txt` has no such files
        pytest.skip(f"pretraining v2 needs the full Fashion-MNIST in {mini_assets.FASHION_ROOT}")
    output = tmp_path / "weights" / "MiniCLIP-ViT.safetensors"
    command = [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        "--config",
        str(REPO / "configs/mini" / config),
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=100",
        f"--model.init_args.output={output}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = load_clip("MiniCLIP-ViT", str(output))  # the exported fp16 weights load back
    assert loaded.image_size == 32
    assert (output.parent / "open_clip_config.json").is_file()
    if config == "pretrain_v2.yaml":  # continues from the v1 weights, and writes a snapshot per validation
        assert (output.parent / "MiniCLIP-ViT.step3.safetensors").is_file()
