"""The rules of extension (docs/architecture.md), enforced: every method, defence and attack the
package exports has its config, its README row and a name that follows the naming rule; and the
worked example, a new static method added as one class and one YAML, merges through the CLI."""

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import safemerge.attacks
import safemerge.defenses
import safemerge.merging
from safemerge.attacks import Attack
from safemerge.cli import main
from safemerge.defenses import Defense
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, mini_backdoor
from safemerge.io import Expert, expert_info, read_expert, write_expert
from safemerge.merging import MergeMethod, StaticMerge, task_arithmetic
from safemerge.models import load_clip
from safemerge.protocol.pools import experts_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
README = (REPO / "README.md").read_text()


def registered(package, base) -> list[type]:
    """The concrete classes a package exports of one kind: a subclass of ``base`` that sets its
    own ``name`` (abstract bases such as ``StaticMerge`` set none)."""
    found = [getattr(package, n) for n in package.__all__]
    return [c for c in found if inspect.isclass(c) and issubclass(c, base) and "name" in vars(c)]


def follows_the_naming_rule(cls) -> bool:
    """``name`` is snake_case and the class name is it in CamelCase (acronyms may stay upper case):
    lower-cased, the class name is the name without its underscores."""
    return cls.name == cls.name.lower() and cls.__name__.lower() == cls.name.replace("_", "")


def _class_path(config: Path, slot: str) -> str:
    return yaml.safe_load(config.read_text())["model"]["init_args"][slot]["class_path"]


METHODS = registered(safemerge.merging, MergeMethod)
DEFENSES = registered(safemerge.defenses, Defense)
ATTACKS = registered(safemerge.attacks, Attack)


def test_every_kind_has_registered_classes():
    # a registry that finds nothing would make every rule below pass
    assert {c.__name__ for c in METHODS} >= {"WeightAverage", "TaskArithmetic", "Ties", "AdaMerging", "DAMAdaMerging"}
    assert {c.__name__ for c in DEFENSES} >= {"AWM", "SAU"}
    assert {c.__name__ for c in ATTACKS} >= {"BadNets", "Blended", "OptimizedPatch"}


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_a_method_has_its_config_its_readme_row_and_its_name(cls):
    assert follows_the_naming_rule(cls), f"{cls.__name__}.name = {cls.name!r} breaks the naming rule"
    config = CONFIGS / "merge" / f"{cls.name}.yaml"
    assert config.is_file(), f"{cls.__name__} has no configs/merge/{cls.name}.yaml"
    assert _class_path(config, "method") == f"safemerge.merging.{cls.__name__}"
    assert f"| `{cls.name}` | `{cls.__name__}" in README, f"README's methods table has no row for `{cls.name}`"


@pytest.mark.parametrize("cls", DEFENSES, ids=lambda c: c.__name__)
def test_a_defence_has_its_config_its_readme_row_and_its_name(cls):
    assert follows_the_naming_rule(cls), f"{cls.__name__}.name = {cls.name!r} breaks the naming rule"
    config = CONFIGS / "defense" / f"{cls.name}.yaml"
    assert config.is_file(), f"{cls.__name__} has no configs/defense/{cls.name}.yaml"
    assert _class_path(config, "defense") == f"safemerge.defenses.{cls.__name__}"
    assert f"| `{cls.name}` | `{cls.__name__}`" in README, f"README's defences table has no row for `{cls.name}`"


def _attacks_in_use() -> set[str]:
    """Attack class paths of every fine-tuning config and of every mini pool's backdoored experts."""
    used = set()
    for config in CONFIGS.rglob("*.yaml"):
        attack = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("init_args", {}).get("attack")
        if isinstance(attack, dict):
            used.add(attack["class_path"])
    for pool in (CONFIGS / "pools").glob("*.yaml"):
        for reference in experts_of(pool):
            if reference.count(":") == 2:
                _, task, variant = reference.split(":")
                used.add(mini_backdoor(task, variant)["class_path"])
    return used


@pytest.mark.parametrize("cls", ATTACKS, ids=lambda c: c.__name__)
def test_an_attack_has_a_config_using_it_its_readme_entry_and_its_name(cls):
    assert follows_the_naming_rule(cls), f"{cls.__name__}.name = {cls.name!r} breaks the naming rule"
    assert f"safemerge.attacks.{cls.__name__}" in _attacks_in_use(), (
        f"no fine-tuning config (data.init_args.attack) and no pool uses {cls.__name__}"
    )
    row = next(line for line in README.splitlines() if line.startswith("| attacks |"))
    assert f"`{cls.__name__}`" in row, f"README's attacks row does not name `{cls.__name__}`"


def test_the_naming_rule_refuses_a_mismatch():
    class TaskArithmeticPlus(StaticMerge):
        name = "task_arithmetic"

    class Shouting(StaticMerge):
        name = "Shouting"

    assert not follows_the_naming_rule(TaskArithmeticPlus) and not follows_the_naming_rule(Shouting)
    assert follows_the_naming_rule(safemerge.merging.DAMAdaMerging)


# ----------------------------------------------------------------------------- the worked example


@dataclass(eq=False)
class FirstExpert(StaticMerge):
    """``θ0 + λ τ_0``: the first expert's task vector only (docs/architecture.md's worked example)."""

    name = "first_expert"
    scaling_factor: float = 1.0

    def merge(self, base, experts):
        return task_arithmetic(base, experts[:1], self.scaling_factor)


FIRST_EXPERT_YAML = f"""\
model:
  init_args:
    method:
      class_path: {__name__}.FirstExpert
      init_args:
        scaling_factor: 0.5
"""


def _tiny_experts(directory: Path) -> tuple[dict, list[Path]]:
    """Two clean experts on the mini model: the base tower plus a seeded perturbation each."""
    base = load_clip(MINI_MODEL, MINI_WEIGHTS).visual.state_dict()
    generator = torch.Generator().manual_seed(0)
    paths = []
    for task in ("mini_shapes", "mini_terrain"):
        encoder = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        info = expert_info(
            model=MINI_MODEL,
            pretrained=MINI_WEIGHTS,
            task=task,
            num_classes=6,
            backdoor=None,
            metrics={"accuracy": 0.5, "asr": None},
            image_size=32,
        )
        paths.append(write_expert(directory / task, Expert(encoder=encoder, info=info)))
    return base, paths


def test_a_new_static_method_is_one_class_and_one_yaml_and_merges_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["trainer.py"])
    monkeypatch.chdir(tmp_path)
    base, experts = _tiny_experts(tmp_path / "experts")
    config = tmp_path / "first_expert.yaml"
    config.write_text(FIRST_EXPERT_YAML)
    out = tmp_path / "out"
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "merge" / "base.yaml"),
            "--config",
            str(config),
            "--model.init_args.experts=[" + ",".join(map(str, experts)) + "]",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--data.init_args.eval_batch_size=250",
            f"--model.init_args.output_dir={out}",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "first_expert" and report["config"]["method"]["scaling_factor"] == 0.5
    assert list(report["tasks"]) == ["mini_shapes", "mini_terrain"]
    merged = read_expert(out / "merged").encoder
    first = read_expert(experts[0]).encoder
    for key, value in base.items():  # θ0 + 0.5 (θ_first − θ0), by hand; the second expert is left out
        expected = value + 0.5 * (first[key] - value) if value.is_floating_point() else value
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
