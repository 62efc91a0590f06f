"""Merging through the module and the CLI: every method, the report, the exported tower,
bad expert pools, and DDP."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from quick_pool import QUICK, quick_pool

import safemerge.merging
from safemerge.cli import main
from safemerge.data import get_task
from safemerge.data.merge import AdaptationStream
from safemerge.experts import MINI_MODEL, MINI_RECIPE, MINI_WEIGHTS, ExpertSpec, ensure_expert
from safemerge.io import load_tensors, read_expert, write_json
from safemerge.merging import DAMTaskArithmetic, TaskArithmetic, Ties, task_arithmetic, ties_merging
from safemerge.models import ImageClassifier, cached_task_heads, load_clip
from safemerge.modules import MergeModule

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "merge" / "base.yaml"
METHOD_CONFIGS = sorted(c for c in (REPO / "configs" / "merge").glob("*.yaml") if c != BASE)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["trainer.py"])


@pytest.fixture(scope="session")
def pool() -> list[str]:
    """The shared quick pool (tests/quick_pool.py)."""
    return quick_pool()


def _experts_arg(pool):
    return "--model.init_args.experts=[" + ",".join(pool) + "]"


def _short(config: Path) -> list[str]:
    """Overrides that make a method's config run a couple of steps."""
    method = yaml.safe_load(config.read_text())["model"]["init_args"]["method"].get("init_args") or {}
    args = [f"--model.init_args.method.init_args.{key}=2" for key in ("steps", "adamerging_steps") if key in method]
    return args + ["--trainer.val_check_interval=null", "--data.init_args.eval_batch_size=250"]


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=[c.stem for c in METHOD_CONFIGS])
def test_every_method_merges_through_the_cli_and_writes_the_report(config, pool, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(
        [
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(config),
            *QUIET,
            _experts_arg(pool),
            *_short(config),
            f"--model.init_args.output_dir={out}",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "safemerge-report/1" and report["method"] == config.stem
    assert list(report["tasks"]) == ["mini_shapes", "mini_terrain", "mini_letters"]
    for task, r in report["tasks"].items():
        assert 0 <= r["accuracy"] <= 1 and 0 < r["expert_accuracy"] <= 1
        assert r["normalized_accuracy"] == pytest.approx(r["accuracy"] / r["expert_accuracy"])
    # the shape expert's own backdoor, and the digit expert's backdoor on the colour task
    assert report["tasks"]["mini_terrain"]["asr"] is not None and report["tasks"]["mini_shapes"]["asr"] is not None
    assert report["tasks"]["mini_letters"]["asr"] is None
    assert [b["target_task"] for b in report["backdoors"]] == ["mini_terrain", "mini_shapes"]
    assert report["average"]["accuracy"] == pytest.approx(sum(r["accuracy"] for r in report["tasks"].values()) / 3)
    assert report["average"]["asr"] == pytest.approx(
        (report["tasks"]["mini_terrain"]["asr"] + report["tasks"]["mini_shapes"]["asr"]) / 2
    )
    assert "| **average** |" in (out / "report.md").read_text()
    merged = read_expert(out / "merged")
    assert (
        merged.info["tasks"] == ["mini_shapes", "mini_terrain", "mini_letters"] and merged.info["method"] == config.stem
    )
    class_name = yaml.safe_load(config.read_text())["model"]["init_args"]["method"]["class_path"].rsplit(".", 1)[1]
    learned = getattr(safemerge.merging, class_name).kind == "learned"  # a static method learns nothing
    assert (out / "learned.safetensors").is_file() == learned
    assert report["defense"] is None and report["config"]["defense"] is None


def test_the_cli_resolves_mini_references_into_directories_before_building_the_module(pool, tmp_path, monkeypatch):
    """``mini:<task>[:backdoored]`` in a config become expert directories (the mini recipe's
    specs, fine-tuned on first use: here mapped onto the quick pool) before MergeModule exists."""
    import safemerge.experts as experts_module

    requested = []

    def cached(spec, accelerator="auto"):
        requested.append((spec.task, spec.attack is not None, spec.max_steps))
        return Path(pool[["mini_shapes", "mini_terrain"].index(spec.task)])

    monkeypatch.setattr(experts_module, "ensure_expert", cached)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(
        [
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(REPO / "configs" / "merge" / "task_arithmetic.yaml"),
            *QUIET,
            "--model.init_args.experts=[mini:mini_shapes,mini:mini_terrain:backdoored]",
            "--data.init_args.eval_batch_size=250",
            f"--model.init_args.output_dir={out}",
        ]
    )
    steps = MINI_RECIPE["max_steps"]
    assert requested == [("mini_shapes", False, steps), ("mini_terrain", True, steps)]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["experts"] == pool[:2] and list(report["tasks"]) == ["mini_shapes", "mini_terrain"]


def _printed_config(capsys, *configs: Path) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_the_main_job_is_the_base_composed_with_expert_label_merging_and_sau_on_expert_labels(capsys):
    """configs/merge.yaml runs on its own; it is the same merge as base + expert_label_merging +
    orthogonal_task_vectors + clean_subspace + sau + expert_labels + one_attack_step + l2_examples +
    alternate_examples + steps_200."""
    main_job = _printed_config(capsys, REPO / "configs" / "merge.yaml")
    composed = _printed_config(
        capsys,
        BASE,
        REPO / "configs" / "merge" / "expert_label_merging.yaml",
        *(
            REPO / "configs" / "merge_options" / f"{name}.yaml"
            for name in ("orthogonal_task_vectors", "clean_subspace")
        ),
        *(
            REPO / "configs" / "defense" / f"{name}.yaml"
            for name in ("sau", "expert_labels", "one_attack_step", "l2_examples", "alternate_examples", "steps_200")
        ),
    )
    composed["model"]["init_args"]["output_dir"] = main_job["model"]["init_args"]["output_dir"]
    assert main_job["model"] == composed["model"] and main_job["data"] == composed["data"]
    assert main_job["model"]["init_args"]["defense"]["class_path"] == "safemerge.defenses.SAU"
    assert main_job["model"]["init_args"]["defense"]["init_args"]["pseudo_labels"] == "experts"
    assert main_job["model"]["init_args"]["defense"]["init_args"]["attack_steps"] == 1
    assert main_job["model"]["init_args"]["defense"]["init_args"]["l2_weight"] == 1.0
    assert main_job["model"]["init_args"]["defense"]["init_args"]["alternate"] is True
    assert main_job["model"]["init_args"]["method"]["class_path"] == "safemerge.merging.ExpertLabelMerging"
    assert main_job["model"]["init_args"]["method"]["init_args"]["task_vectors"] == "orthogonal"
    assert main_job["model"]["init_args"]["clean_subspace"] == 0.8
    assert composed["trainer"]["logger"]["init_args"]["name"] == "expert_label_merging"  # the logger's name merged in


# ----------------------------------------------------------------------------- a defended merge, checked from its files


@pytest.fixture(scope="module")
def defended(pool, tmp_path_factory) -> Path:
    """DAM (patch trigger, attribution with cap) over the quick pool, AWM on top, through the CLI."""
    out = tmp_path_factory.mktemp("defended") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["trainer.py"])  # module-scoped: the autouse fixture has not run yet
        _defended_fit(pool, out)
    return out


def _defended_fit(pool, out: Path) -> None:
    main(
        [
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(REPO / "configs" / "merge" / "dam_task_arithmetic.yaml"),
            "--config",
            str(REPO / "configs" / "dam" / "patch_trigger.yaml"),
            "--config",
            str(REPO / "configs" / "defense" / "awm.yaml"),
            *QUIET,
            _experts_arg(pool),
            "--model.init_args.method.init_args.steps=2",
            "--model.init_args.method.init_args.attribution=cap",
            "--model.init_args.defense.init_args.steps=2",
            "--trainer.val_check_interval=null",
            "--data.init_args.eval_batch_size=250",
            f"--model.init_args.output_dir={out}",
            f"--trainer.default_root_dir={out.parent}",
        ]
    )


def test_a_defence_is_applied_on_top_of_the_method_and_recorded(defended, pool):
    report = json.loads((defended / "report.json").read_text())
    assert report["method"] == "dam_task_arithmetic" and report["config"]["method"]["trigger"] == "patch"
    assert report["defense"]["name"] == "awm" and report["defense"]["params"]["steps"] == 2
    assert report["config"]["adaptation_steps"] == 4  # 2 DAM steps, then 2 AWM steps
    assert "Defence: awm (" in (defended / "report.md").read_text()
    attribution = report["attribution"]
    assert (
        set(attribution["drop"]) == {"mini_shapes", "mini_terrain", "mini_letters"} and attribution["action"] == "cap"
    )
    assert attribution["expert"] in pool
    learned = load_tensors(defended / "learned.safetensors")
    mask = learned["defense_parts.masked_update.mask.0"]
    assert ((mask >= 0) & (mask <= 1)).all() and not torch.equal(mask, torch.ones_like(mask))
    assert read_expert(defended / "merged").info["defense"] == "awm"


def _classifier(weights: dict, tasks: list[str]) -> ImageClassifier:
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    clip.visual.load_state_dict(weights)
    return ImageClassifier(
        clip.visual, cached_task_heads(clip, [get_task(t) for t in tasks]), clip.mean, clip.std
    ).eval()


@torch.no_grad()
def _predictions(classifier, task: str, transform=lambda x: x):
    images, labels = zip(*get_task(task).build("test", root=None, image_size=32, download=False, seed=0))
    images, labels = torch.stack(images), torch.tensor(labels)
    return classifier(transform(images), task).argmax(-1), labels


def test_report_asr_and_expert_accuracy_equal_a_recomputation_from_the_files(defended, pool):
    """On-task (shape expert → shape) and off-task (digit expert → colour) backdoors: the ASR
    in report.json is recomputed from merged/ and each expert's trigger.safetensors with the
    target task's head; expert_accuracy from a fresh evaluation of each expert directory."""
    from safemerge.attacks import Trigger

    report = json.loads((defended / "report.json").read_text())
    tasks = list(report["tasks"])
    merged = _classifier(read_expert(defended / "merged").encoder, tasks)
    checked = 0
    for directory in pool:
        expert = read_expert(directory)
        backdoor = expert.backdoor
        if backdoor:
            trigger = Trigger.from_tensors(load_tensors(Path(directory) / "trigger.safetensors"))
            target, target_class = backdoor.get("target_task") or expert.task, int(backdoor["target_class"])
            predicted, labels = _predictions(merged, target, trigger.apply)
            eligible = labels != target_class
            asr = float((predicted[eligible] == target_class).float().mean())
            assert report["tasks"][target]["asr"] == pytest.approx(asr, abs=1e-6), (directory, target)
            clean, _ = _predictions(merged, target)  # the untriggered target rate, on the same images
            untriggered = float((clean[eligible] == target_class).float().mean())
            assert report["tasks"][target]["target_rate"] == pytest.approx(untriggered, abs=1e-6), (directory, target)
            checked += 1
        own = _classifier(expert.encoder, [expert.task])
        predicted, labels = _predictions(own, expert.task)
        assert report["tasks"][expert.task]["expert_accuracy"] == pytest.approx(
            float((predicted == labels).float().mean()), abs=1e-6
        )
        predicted, labels = _predictions(merged, expert.task)
        assert report["tasks"][expert.task]["accuracy"] == pytest.approx(
            float((predicted == labels).float().mean()), abs=1e-6
        )
    assert checked == 2
    assert {b["target_task"] for b in report["backdoors"]} == {"mini_terrain", "mini_shapes"}  # on-task and off-task


BAD_DEFENCES = {
    "no adaptation data": (
        ["--config", str(REPO / "configs" / "defense" / "sau.yaml"), "--data.init_args.adaptation_limit=0"],
        "task mini_shapes has no adaptation images",
    ),
    "patch larger than the image": (
        [
            "--config",
            str(REPO / "configs" / "merge" / "dam_task_arithmetic.yaml"),
            "--config",
            str(REPO / "configs" / "dam" / "patch_trigger.yaml"),
            "--model.init_args.method.init_args.patch_size=64",
        ],
        "patch_size 64 is larger than the image",
    ),
    "negative area penalty": (
        [
            "--config",
            str(REPO / "configs" / "merge" / "dam_task_arithmetic.yaml"),
            "--model.init_args.method.init_args.area_weight=-0.1",
        ],
        "area_weight .* must be >= 0",
    ),
}


@pytest.mark.parametrize("args, message", BAD_DEFENCES.values(), ids=BAD_DEFENCES.keys())
def test_bad_defence_inputs_are_one_line_errors_that_write_nothing(args, message, pool, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(BASE), *args, *QUIET, _experts_arg(pool), f"--model.init_args.output_dir={out}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and __import__("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_expert_paths_may_use_environment_variables_and_an_unset_one_is_a_one_line_error(
    pool, tmp_path, monkeypatch, capsys
):
    """As the paper configs do (``$SAFEMERGE_EXPERTS/gtsrb``): the CLI expands the variables
    before the module reads the experts; an unset one is named, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    parent, names = Path(pool[0]).parent, [Path(p).name for p in pool[:2]]
    assert all(Path(p).parent == parent for p in pool[:2])
    experts = "--model.init_args.experts=[" + ",".join(f"$SAFEMERGE_EXPERTS/{n}" for n in names) + "]"
    monkeypatch.delenv("SAFEMERGE_EXPERTS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(BASE), *QUIET, experts, f"--model.init_args.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "an environment variable in it is not set" in err and "$SAFEMERGE_EXPERTS/" in err
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setenv("SAFEMERGE_EXPERTS", str(parent))
    main(
        [
            "fit",
            "--config",
            str(BASE),
            *QUIET,
            experts,
            "--trainer.limit_test_batches=1",
            f"--model.init_args.output_dir={tmp_path / 'out'}",
        ]
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["experts"] == pool[:2] and list(report["tasks"]) == ["mini_shapes", "mini_terrain"]


def _module(pool, method) -> MergeModule:
    return MergeModule(experts=pool, method=method, output_dir=None)


def test_static_methods_merge_exactly_as_the_pure_functions(pool):
    base = load_clip(MINI_MODEL, MINI_WEIGHTS).visual.state_dict()
    experts = [read_expert(p).encoder for p in pool]
    for method, reference in (
        (TaskArithmetic(0.4), task_arithmetic(base, experts, 0.4)),
        (Ties(k=0.3, scaling_factor=0.5), ties_merging(base, experts, 0.3, 0.5)),
    ):
        merged = _module(pool, method).merged_weights()
        assert all(torch.allclose(merged[k].float(), reference[k].float(), atol=1e-6) for k in reference)


def test_merged_tower_gives_the_logits_of_a_plain_tower_loaded_with_the_exported_weights(pool):
    module = _module(pool, DAMTaskArithmetic(steps=3, perturbation_lr=0.01))
    learner = module.learner
    optimizers = learner.make_optimizers()
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        learner.training_step(
            step, {t: torch.rand(4, 3, 32, 32, generator=generator) for t in module.task_names}, optimizers
        )
    weights = module.merged_weights()
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    clip.visual.load_state_dict(weights)
    tasks = [get_task(t) for t in module.task_names]
    plain = ImageClassifier(clip.visual, cached_task_heads(clip, tasks), clip.mean, clip.std).eval()
    images = torch.rand(16, 3, 32, 32, generator=generator)
    with torch.no_grad():
        for task in module.task_names:
            assert torch.allclose(module._logits(images, weights, task), plain(images, task), atol=1e-5)


def test_adaptation_batches_are_sharded_so_processes_see_the_single_process_batch():
    data = {
        "a": torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 1, 1), torch.zeros(10))
    }
    single = list(AdaptationStream(data, batch_size=4, steps=5, seed=1))
    shards = [list(AdaptationStream(data, batch_size=4, steps=5, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(single) == 5
    for step in range(5):
        whole = single[step]["a"][:, 0, 0, 0]
        assert torch.equal(shards[0][step]["a"][:, 0, 0, 0], whole[0::2])
        assert torch.equal(shards[1][step]["a"][:, 0, 0, 0], whole[1::2])
    seen = torch.cat([b["a"][:, 0, 0, 0] for b in single[:5]])  # 20 draws = two epochs of 10
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible"):
        AdaptationStream(data, batch_size=3, steps=1, world_size=2)


def test_a_resumed_adaptation_stream_continues_with_the_batches_of_an_uninterrupted_one():
    data = {
        t: torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1, 1, 1) + i, torch.zeros(10))
        for i, t in enumerate("ab")
    }
    whole = list(AdaptationStream(data, batch_size=4, steps=7, seed=1))
    for workers in (0, 2):
        resumed = AdaptationStream(data, batch_size=4, steps=7, seed=1, start=3)
        tail = list(torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=workers))
        assert len(resumed) == 7 and len(tail) == 4  # the schedule's length; the steps left
        assert all(torch.equal(a[t], b[t]) for a, b in zip(whole[3:], tail) for t in "ab"), workers


# ----------------------------------------------------------------------------- bad pools


def _copy_expert(source: str, target: Path, *, info=None, tensor=None) -> str:
    shutil.copytree(source, target)
    if info:
        document = json.loads((target / "expert.json").read_text())
        document.update(info)
        write_json(target / "expert.json", document)
    if tensor:
        from safemerge.io import save_tensors

        encoder = load_tensors(target / "encoder.safetensors")
        name = next(k for k in encoder if k.endswith(tensor))
        encoder[name] = encoder[name].clone()
        encoder[name].view(-1)[0] = float("nan")
        save_tensors(target / "encoder.safetensors", encoder)
    return str(target)


BAD_POOLS = {
    "another architecture": (
        {"model": "TinyCLIP-ViT-32"},
        None,
        "different pretrained models: .*bad' from TinyCLIP-ViT-32 \\(mini2\\)",
    ),
    "another pretrained base": (
        {"pretrained": "openai"},
        None,
        "different pretrained models: .*bad' from MiniCLIP-ViT \\(openai\\)",
    ),
    "non-finite weights": (None, "conv1.weight", "tensor 'conv1.weight' has 1 non-finite values"),
    "unknown task": ({"task": "mini_nope"}, None, "unknown task 'mini_nope'"),
    "duplicate task": ({}, None, "are both for task mini_shapes"),
}


@pytest.mark.parametrize("info, tensor, message", BAD_POOLS.values(), ids=BAD_POOLS.keys())
def test_bad_expert_pools_are_clear_errors_naming_the_expert(
    info, tensor, message, pool, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    duplicate = info == {}
    bad = _copy_expert(pool[0 if duplicate else 1], tmp_path / "experts" / "bad", info=info, tensor=tensor)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(BASE),
                "--config",
                str(REPO / "configs" / "merge" / "task_arithmetic.yaml"),
                *QUIET,
                _experts_arg([pool[0], bad] if duplicate else [pool[0], bad, pool[2]]),
                f"--model.init_args.output_dir={out}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert bad in err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.init_args.experts=[mini:mini_nope]"], "unknown mini expert 'mini:mini_nope'"),
        (["--model.init_args.experts=[mini:mini_shapes:backdoored]"], "no .backdoored. expert for mini_shapes"),
        (["--model.init_args.experts=[]"], "no experts to merge"),
        (
            ["--model.init_args.pretrained=openai"],
            "fine-tuned from MiniCLIP-ViT \\(mini2\\), but the base is MiniCLIP-ViT \\(openai\\)",
        ),
    ],
    ids=["unknown mini expert", "no such backdoored mini expert", "empty pool", "base of another pretraining"],
)
def test_bad_expert_references_are_clear_errors(args, message, pool, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(BASE),
                "--config",
                str(REPO / "configs" / "merge" / "task_arithmetic.yaml"),
                *QUIET,
                _experts_arg(pool),
                *args,
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and __import__("re").search(message, err), err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- DDP


def _merge_command(pool, out: Path, *extra: str, launcher=(sys.executable,)) -> list[str]:
    """A small learned merge in a fresh process: DAM over AdaMerging (3 mask steps, 2 λ steps)
    with AWM (2 steps) on top, 4 images per task per step."""
    return [
        *launcher,
        str(REPO / "trainer.py"),
        "fit",
        "--config",
        str(BASE),
        "--config",
        str(REPO / "configs" / "merge" / "dam_adamerging.yaml"),
        "--config",
        str(REPO / "configs" / "defense" / "awm.yaml"),
        "--model.init_args.defense.init_args.steps=2",
        *QUIET,
        _experts_arg(pool),
        "--trainer.accelerator=cpu",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--model.init_args.method.init_args.steps=3",
        "--model.init_args.method.init_args.adamerging_steps=2",
        "--model.init_args.method.init_args.perturbation_lr=0.01",
        "--data.init_args.batch_size=4",
        f"--model.init_args.output_dir={out}",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def _fit(pool, out: Path, *extra: str, launcher=(sys.executable,), env=None) -> dict[str, torch.Tensor]:
    result = subprocess.run(
        _merge_command(pool, out, *extra, launcher=launcher),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return load_tensors(out / "learned.safetensors")


def test_ddp_learns_the_same_coefficients_and_mask_as_a_single_process(pool, tmp_path):
    """Two gloo processes with 2 images per task each learn what one process learns from the
    same 4 images per task: gradients are averaged per phase, mask samples are seeded. The run
    is DAM over AdaMerging with AWM on top, so a learned defence is covered too, with expert
    pseudo-labels (each rank labels its own images; the slow torchrun test covers the merged
    model's labels)."""
    expert_labels = ("--config", str(REPO / "configs" / "defense" / "expert_labels.yaml"))
    single = _fit(pool, tmp_path / "single", *expert_labels)
    ddp = _fit(pool, tmp_path / "ddp", "--trainer.strategy=ddp", "--trainer.devices=2", *expert_labels)
    assert single.keys() == ddp.keys()
    learned = [
        "coefficients",
        "mask.logits.0",
        "perturbation.deltas.0",
        "defense_parts.masked_update.mask.0",
        "defense_parts.trigger.deltas.0",
    ]
    assert set(learned) <= single.keys()
    # everything learned moved from its initial value (mask logits 0, δ 0, defence mask 1)
    assert not torch.equal(single["mask.logits.0"], torch.zeros_like(single["mask.logits.0"]))
    assert not torch.equal(single["perturbation.deltas.0"], torch.zeros_like(single["perturbation.deltas.0"]))
    defense_mask = single["defense_parts.masked_update.mask.0"]
    assert not torch.equal(defense_mask, torch.ones_like(defense_mask))
    assert not torch.equal(
        single["defense_parts.trigger.deltas.0"], torch.zeros_like(single["defense_parts.trigger.deltas.0"])
    )
    for name in single:
        # Float sums in another order; Adam divides by √v, which magnifies them where a
        # gradient is tiny (a few δ pixels on the black backgrounds of digits and fashion moved
        # 4e-5 in a measured run, out of 0.03): 5e-5 absolute.
        assert torch.allclose(single[name], ddp[name], rtol=1e-4, atol=5e-5), name
    assert not torch.equal(single["coefficients"], torch.full_like(single["coefficients"], 0.3))
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["config"]["world_size"] == 2
    assert report["defense"]["name"] == "awm" and report["defense"]["params"]["pseudo_labels"] == "experts"


@pytest.mark.slow  # two merges, one through torchrun: about 2 min on 2 cores
def test_torchrun_processes_learn_what_one_process_learns_and_write_one_wandb_run(pool, tmp_path):
    """The multi-node launch path (README, "Several machines"), on one node: torchrun starts two
    gloo processes that Lightning joins from torchrun's environment; W&B, offline, records one run."""
    import os

    single = _fit(pool, tmp_path / "single")
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2")
    wandb_dir = tmp_path / "wandb-logs"
    ddp = _fit(
        pool,
        tmp_path / "torchrun",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.num_nodes=1",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        f"--trainer.logger.init_args.save_dir={wandb_dir}",
        "--trainer.logger.init_args.project=safemerge-test",
        launcher=launcher,
        env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    for name in single:
        # Float sums in another order; Adam divides by √v, which magnifies them where a
        # gradient is tiny (a few δ pixels on the black backgrounds of digits and fashion moved
        # 4e-5 in a measured run, out of 0.03): 5e-5 absolute.
        assert torch.allclose(single[name], ddp[name], rtol=1e-4, atol=5e-5), name
    assert json.loads((tmp_path / "torchrun" / "report.json").read_text())["config"]["world_size"] == 2
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("*.wandb")), "the run recorded nothing"


def test_an_expert_fine_tuned_while_the_cli_builds_the_merge_module_gets_its_own_hyperparameters():
    """The first run of configs/merge.yaml fine-tunes mini experts inside MergeModule.__init__,
    i.e. inside LightningCLI's instantiation context."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    spec = ExpertSpec("mini_textures", MINI_MODEL, MINI_WEIGHTS, **{**QUICK, "max_steps": 2})
    with _given_hyperparameters_context({"experts": ["mini:mini_textures"], "method": None}, "MergeModule"):
        directory = ensure_expert(spec, accelerator="cpu")
    assert read_expert(directory).task == "mini_textures"


# ----------------------------------------------------------------------------- resuming

QUICK_TEST = ["--trainer.limit_test_batches=1"]  # the report from the first 500 test images of every view
STOP = '--trainer.callbacks+={{"class_path": "interrupt.SignalAfter", "init_args": {{"steps": {steps}, "signal_name": "{signal}"}}}}'


def _run(pool, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "tests")}  # for interrupt.SignalAfter
    return subprocess.run(
        _merge_command(pool, out, *QUICK_TEST, *extra),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
        env=env,
    )


def _outcome(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    report = json.loads((out / "report.json").read_text())
    report.pop("runtime_s")
    return load_tensors(out / "learned.safetensors"), report


@pytest.fixture(scope="module")
def uninterrupted(pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = _run(pool, out)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize(
    "signal, steps, every, resumed_at",
    [
        ("SIGTERM", 6, 100, 6),  # in AWM: λ, mask, δ, the attribution's cap and the defence's Δ are all under way
        ("SIGKILL", 5, 2, 4),  # no chance to save: the periodic checkpoint of step 4 (in AdaMerging)
    ],
    ids=["sigterm-in-the-defence", "killed-after-a-periodic-checkpoint"],
)
def test_an_interrupted_merge_resumes_with_ckpt_path_last_to_the_uninterrupted_result(
    signal, steps, every, resumed_at, pool, uninterrupted, tmp_path
):
    """7 steps (3 DAM mask steps, 2 AdaMerging steps, 2 AWM steps), interrupted after ``steps``,
    then ``--ckpt_path last``: every learned tensor and the report equal an uninterrupted run's.
    The resumed steps need the optimizers' moments, the stream's position, the attribution's
    edit of the task vectors and the defence's Δ restored: without any of them this fails."""
    out = tmp_path / "out"
    interrupted = _run(
        pool, out, f"--model.init_args.checkpoint_every={every}", STOP.format(steps=steps, signal=signal)
    )
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["safemerge"]["completed_steps"] == resumed_at, interrupted.stderr[-4000:]
    assert not (out / "report.json").exists() and not (out / "learned.safetensors").exists()
    if signal == "SIGTERM":
        assert interrupted.returncode == 143, interrupted.stderr[-4000:]
        assert "received SIGTERM after 6 of 7 adaptation steps" in interrupted.stderr
        assert "--ckpt_path last" in interrupted.stderr and "Traceback" not in interrupted.stderr
    # only the trainable state: no frozen task vector, no base weight
    assert not any(
        k.startswith(("encoder.", "learner.encoder.", "clip.", "classifier.")) for k in checkpoint["state_dict"]
    )

    resumed = _run(pool, out, f"--model.init_args.checkpoint_every={every}", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    (learned, report), (expected, expected_report) = _outcome(out), _outcome(uninterrupted)
    assert learned.keys() == expected.keys() and int(learned["completed_steps"]) == 7
    difference = max(float((learned[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert difference <= 1e-6, difference
    assert report == expected_report


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while the checkpoint was read",))


def _tamper(checkpoint: dict, path: Path) -> None:
    checkpoint["state_dict"]["coefficients"] = torch.zeros(2, 3)
    torch.save(checkpoint, path)


def _drop_tensor(checkpoint: dict, path: Path) -> None:
    del checkpoint["state_dict"]["mask.logits.0"]
    torch.save(checkpoint, path)


BAD_RESUMES = {
    "no checkpoint": (
        None,
        [],
        "--ckpt_path last: there is no checkpoint to resume in .*checkpoints .*run without --ckpt_path",
    ),
    "another method": (
        "copy",
        ["--model.init_args.method.init_args.steps=4"],
        "another method: steps 3 in the checkpoint, 4 in this run; resume with the method it was written with",
    ),
    "another defence": (
        "copy",
        ["--model.init_args.defense=null"],
        "another defense: awm in the checkpoint, None in this run",
    ),
    "another pool": ("copy", ["pool[:2]"], "another pool: .*resume with the same pool"),
    "another seed": ("copy", ["--seed_everything=1"], "another seed: 0, this run has 1"),
    "learned tensor of another shape": (
        _tamper,
        [],
        "learned tensor 'coefficients' is \\(2, 3\\) torch.float32, this merge's is \\(3, \\d+\\)",
    ),
    "missing learned tensor": (_drop_tensor, [], "1 missing \\(e.g. \\['mask.logits.0'\\]\\)"),
    "a pickle that runs code": (
        lambda c, path: torch.save({"safemerge": _Exploit()}, path),
        [],
        "refusing to load .*last.ckpt",
    ),
    "a merge that learns nothing": ("copy", ["static"], "learns nothing and has nothing to resume: drop --ckpt_path"),
}


@pytest.mark.parametrize("make, args, message", BAD_RESUMES.values(), ids=BAD_RESUMES.keys())
def test_bad_resumes_are_one_line_errors_that_write_nothing(
    make, args, message, pool, uninterrupted, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    if make is not None:
        (out / "checkpoints").mkdir(parents=True)
        target = out / "checkpoints" / "last.ckpt"
        shutil.copy(uninterrupted / "checkpoints" / "last.ckpt", target)
        if make != "copy":
            make(torch.load(target, weights_only=True), target)
    before = sorted(tmp_path.rglob("*"))
    experts = pool[:2] if "pool[:2]" in args else pool
    command = _merge_command(experts, out, *(a for a in args if a not in ("pool[:2]", "static")), "--ckpt_path=last")[
        2:
    ]
    if "static" in args:  # the same checkpoint, offered to task arithmetic
        command = [
            "fit",
            "--config",
            str(BASE),
            "--config",
            str(REPO / "configs" / "merge" / "task_arithmetic.yaml"),
            *QUIET,
            _experts_arg(pool),
            f"--model.init_args.output_dir={out}",
            f"--ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
        ]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and err.count("\n") == 1 and __import__("re").search(message, err), err
    assert "this ran" not in captured.out + err
    assert sorted(tmp_path.rglob("*")) == before
