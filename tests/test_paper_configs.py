"""The paper-scale configs (configs/paper/) and the grid command (scripts/paper_grid.py).

Fast: every composition parses with the reference hyper-parameters, every file in
configs/paper/ is part of one, the grid's dry run prints the pool's fine-tuning and every method
× seed. Slow: every file runs for two steps at 224 px on tiny fake data with random weights (ViT-B-32;
ViT-L-14 is built on the meta device), and the grid end to end (tests/test_grid_table.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from safemerge.cli import main
from safemerge.protocol import grid as paper_grid  # scripts/paper_grid.py is its entry point

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"

MODELS = sorted(p.stem for p in (PAPER / "models").glob("*.yaml"))
ATTACKS = [None, *sorted(p.stem for p in (PAPER / "attacks").glob("*.yaml"))]
POOLS = sorted(p.stem for p in (PAPER / "pools").glob("*.yaml"))
METHODS = sorted(p.stem for p in (PAPER / "methods").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["trainer.py"])


def finetune_configs(model: str, attack: str | None) -> list[Path]:
    return [
        PAPER / "finetune.yaml",
        PAPER / "models" / f"{model}.yaml",
        *([PAPER / "attacks" / f"{attack}.yaml"] if attack else []),
    ]


def merge_configs(pool: str, method: str, large: bool = False) -> list[Path]:
    return [
        PAPER / "merge.yaml",
        PAPER / "pools" / f"{pool}.yaml",
        PAPER / "methods" / f"{method}.yaml",
        *([PAPER / "large.yaml"] if large else []),
    ]


def _args(configs: list[Path]) -> list[str]:
    return [a for c in configs for a in ("--config", str(c))]


def _printed(configs: list[Path], capsys, *extra: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_args(configs), *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_file_of_configs_paper_is_part_of_a_tested_composition():
    used = {PAPER / "finetune.yaml", PAPER / "merge.yaml", PAPER / "large.yaml"}
    used |= {
        PAPER / d / f"{n}.yaml"
        for d, names in (("models", MODELS), ("attacks", ATTACKS[1:]), ("pools", POOLS), ("methods", METHODS))
        for n in names
    }
    assert set(PAPER.rglob("*.yaml")) == used
    assert {p.stem for p in (REPO / "configs" / "merge").glob("*.yaml")} - {"base"} == set(
        METHODS
    )  # every method of configs/merge


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a or "clean")
def test_finetune_compositions_parse_with_the_reference_recipe(model, attack, capsys):
    config = _printed(finetune_configs(model, attack), capsys)
    init = config["model"]["init_args"]
    assert (init["model"], init["pretrained"]) == (model, "openai")
    assert (init["lr"], init["weight_decay"], init["warmup_steps"]) == (1e-5, 0.1, 500)
    assert config["data"]["init_args"]["batch_size"] == 128 and config["trainer"]["max_steps"] == 2000
    attack_config = config["data"]["init_args"]["attack"]
    if attack is None:
        assert attack_config is None
    elif attack.startswith("badmerging"):
        args = attack_config["init_args"]
        assert attack_config["class_path"] == "safemerge.attacks.OptimizedPatch"
        assert args["feature_interpolation"] is True and args["backdoor_weight"] == 5.0
        assert args["target_task"] == ("gtsrb" if attack.endswith("off_task") else None)
    else:
        assert attack_config["class_path"] == "safemerge.attacks.BadNets"


REFERENCE_STEPS = {  # DAM.md: 1000 layer-wise (+ 1000 AdaMerging) / 2000 task arithmetic
    "adamerging": {"adamerging_steps": 1000},
    "concrete_adamerging": {"steps": 1000, "adamerging_steps": 1000},
    "dam_adamerging": {"steps": 1000, "adamerging_steps": 1000, "inner_lr": 1.0},
    "concrete_task_arithmetic": {"steps": 2000},
    "dam_task_arithmetic": {"steps": 2000},
}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_compositions_parse_with_the_reference_hyperparameters(pool, method, capsys):
    config = _printed(merge_configs(pool, method, large=pool == "task_vectors"), capsys)
    init = config["model"]["init_args"]
    tasks = paper_grid.pool_tasks(pool)
    assert init["experts"] == [f"$SAFEMERGE_EXPERTS/{t}" for t in tasks]
    assert config["data"]["init_args"]["batch_size"] == 16 and config["trainer"]["precision"] == "bf16-mixed"
    args = init["method"].get("init_args") or {}
    assert init["method"]["class_path"].rsplit(".", 1)[1].lower() == method.replace("_", "")
    for key, value in REFERENCE_STEPS.get(method, {}).items():
        assert args[key] == value, key
    if "mask_lr" in args:
        assert (args["mask_lr"], args["temperature"], args["scaling_factor"]) == (1e-3, 0.5, 0.3)
    if "adamerging_lr" in args:
        assert args["adamerging_lr"] == 1e-3
    if pool == "task_vectors":
        assert (init["task_vector_dtype"], init["checkpoint_chunk"]) == ("bfloat16", 16)


def test_the_pools_are_the_papers():
    assert paper_grid.pool_tasks("badmerging") == ["cifar100", "gtsrb", "eurosat", "cars", "sun397", "pets"]
    assert paper_grid.pool_tasks("task_vectors") == [
        "cars",
        "dtd",
        "eurosat",
        "gtsrb",
        "mnist",
        "resisc45",
        "sun397",
        "svhn",
    ]


def test_paper_grid_dry_run_fine_tunes_the_pool_once_then_every_method_and_seed(tmp_path, capsys):
    paper_grid.main(
        [
            "--experts",
            str(tmp_path / "experts"),
            "--data",
            "/data",
            "--attack",
            "badmerging_off_task",
            "--adversary",
            "cars",
            "--seeds",
            "0",
            "1",
            "--output",
            str(tmp_path / "out"),
            "--dry-run",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    finetunes = [line for line in lines if "configs/paper/finetune.yaml" in line]
    merges = [line for line in lines if "configs/paper/merge.yaml" in line]
    assert len(finetunes) == 7 and len(lines) == 7 + len(merges)  # 6 clean experts + the adversary's backdoored one
    assert sum("attacks/badmerging_off_task.yaml" in line and "task=cars" in line for line in finetunes) == 1
    assert len(merges) == 4 * 1 + 6 * 2  # static methods (4) once, learned ones (6) per seed
    assert all(f"SAFEMERGE_EXPERTS={tmp_path / 'experts' / 'ViT-B-32'}" in line for line in merges)
    assert all(
        "$SAFEMERGE_EXPERTS/cars-badmerging_off_task," in line and "$SAFEMERGE_EXPERTS/cars," not in line
        for line in merges
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "experts").exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- two real steps each (slow)


def _run_offline(args: list[str], cwd: Path, **env: str) -> None:
    """``trainer.py`` with tests/paper_fakes.py's offline stand-ins, in a fresh process."""
    import os

    command = [sys.executable, str(REPO / "tests" / "paper_fakes.py"), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]


TWO_STEPS_FINETUNE = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_checkpointing=false",
    "--data.init_args.batch_size=2",
    "--data.init_args.eval_batch_size=4",
    "--data.init_args.num_workers=0",
]


def _two_step_merge_args(method: str) -> list[str]:
    args = (
        yaml.safe_load((PAPER / "methods" / f"{method}.yaml").read_text())["model"]["init_args"]["method"].get(
            "init_args"
        )
        or {}
    )
    return [f"--model.init_args.method.init_args.{k}=2" for k in ("steps", "adamerging_steps") if k in args] + [
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.batch_size=1",
        "--data.init_args.eval_batch_size=4",
        "--data.init_args.num_workers=0",
    ]


@pytest.fixture(scope="module")
def vit_b32_experts(tmp_path_factory) -> Path:
    """Expert directories of every paper-pool task for ViT-B-32 (random weights): one encoder
    file, symlinked into each directory, and the BadMerging pool's backdoored CIFAR100 expert."""
    import open_clip

    from safemerge.data import get_task
    from safemerge.io import expert_info, save_tensors, write_json

    root = tmp_path_factory.mktemp("experts")
    torch.manual_seed(1)
    encoder = root / "encoder.safetensors"
    save_tensors(
        encoder,
        {k: v + 1e-3 * torch.randn_like(v) for k, v in open_clip.create_model("ViT-B-32").visual.state_dict().items()},
    )
    trigger = root / "trigger.safetensors"
    from safemerge.attacks import OptimizedPatch

    save_tensors(trigger, OptimizedPatch(size=0.1).make_trigger(224).to_tensors())
    tasks = {t for pool in ("badmerging", "task_vectors") for t in paper_grid.pool_tasks(pool)}
    for name in [*tasks, "cifar100-badmerging_on_task"]:
        task = name.split("-")[0]
        directory = root / name
        directory.mkdir()
        (directory / "encoder.safetensors").symlink_to(encoder)
        backdoor = None
        if name != task:
            backdoor = {"attack": "optimized_patch", "target_task": task, "target_class": 0}
            (directory / "trigger.safetensors").symlink_to(trigger)
        write_json(
            directory / "expert.json",
            expert_info(
                model="ViT-B-32",
                pretrained="openai",
                task=task,
                num_classes=get_task(task).num_classes,
                backdoor=backdoor,
                metrics={"accuracy": 0.5, "asr": None},
            ),
        )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a or "clean")
def test_every_finetune_config_runs_two_steps_at_224_px(attack, tmp_path):
    task = "cifar100"
    _run_offline(
        [
            "fit",
            *_args(finetune_configs("ViT-B-32", attack)),
            f"--data.init_args.task={task}",
            f"--model.init_args.output_dir={tmp_path / 'expert'}",
            *TWO_STEPS_FINETUNE,
            *(["--data.init_args.attack.init_args.steps=2"] if attack and attack.startswith("badmerging") else []),
        ],
        cwd=tmp_path,
    )
    info = json.loads((tmp_path / "expert" / "expert.json").read_text())
    assert info["model"] == "ViT-B-32" and info["image_size"] == 224 and info["task"] == task
    assert (info["backdoor"] is None) == (attack is None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pool, method", [("badmerging", m) for m in METHODS] + [("task_vectors", "dam_task_arithmetic")]
)
def test_every_merge_config_runs_two_steps_at_224_px(pool, method, vit_b32_experts, tmp_path):
    experts = [t + ("-badmerging_on_task" if t == "cifar100" else "") for t in paper_grid.pool_tasks(pool)]
    _run_offline(
        [
            "fit",
            *_args(merge_configs(pool, method, large=pool == "task_vectors")),
            *_two_step_merge_args(method),
            "--model.init_args.experts=[" + ",".join(f"$SAFEMERGE_EXPERTS/{e}" for e in experts) + "]",
            f"--model.init_args.output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        SAFEMERGE_EXPERTS=str(vit_b32_experts),
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == method and list(report["tasks"]) == paper_grid.pool_tasks(pool)
    backdoored = {t for t, r in report["tasks"].items() if r["asr"] is not None}
    assert backdoored == ({"cifar100"} if pool == "badmerging" else set())


def test_vit_l14_paper_model_builds_at_224_px_on_the_meta_device():
    """ViT-L-14 is too large to fine-tune or merge on a CPU test machine: its model file parses
    (above) and its architecture builds, on the meta device, at the paper's image size."""
    import open_clip

    model = yaml.safe_load((PAPER / "models" / "ViT-L-14.yaml").read_text())["model"]["init_args"]["model"]
    tower = open_clip.create_model(model, device="meta").visual
    assert tower.image_size == (224, 224) and sum(p.numel() for p in tower.parameters()) > 300e6


# The grid end to end on the mini pool, its table against its reports: tests/test_grid_table.py
