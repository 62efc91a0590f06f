"""FusionBench's TA8 pool (configs/paper/pools/fusionbench_ta8.yaml) and the class names and prompt
templates of its tasks, against verbatim copies of the published lists (tests/data/: FusionBench's
fusion_bench/tasks/clip_classification/*.py and modelpool, task_vectors' src/datasets/templates.py
and its GTSRB/EuroSAT class names), so zero-shot heads, and so accuracies, compare with their tables.
"""

import runpy
from pathlib import Path

import pytest
import yaml

from safemerge.data import get_task

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
FUSIONBENCH = DATA / "fusionbench"

# FusionBench's task name -> safemerge's (the only difference: the Stanford Cars name).
FUSIONBENCH_TASKS = {
    "sun397": "sun397",
    "stanford-cars": "cars",
    "resisc45": "resisc45",
    "eurosat": "eurosat",
    "svhn": "svhn",
    "gtsrb": "gtsrb",
    "mnist": "mnist",
    "dtd": "dtd",
}
# FusionBench's module of each task (its CLIPTemplateFactory maps "stanford-cars" to stanford_cars.py).
FUSIONBENCH_MODULES = {name: name.replace("-", "_") for name in FUSIONBENCH_TASKS}
# task_vectors' dataset names (its dataset_to_template keys).
TASK_VECTORS_NAMES = {
    "sun397": "SUN397",
    "cars": "Cars",
    "resisc45": "RESISC45",
    "eurosat": "EuroSAT",
    "svhn": "SVHN",
    "gtsrb": "GTSRB",
    "mnist": "MNIST",
    "dtd": "DTD",
}
# EuroSAT's class folders (2750/<folder>/*.jpg); ImageFolder numbers them in sorted order.
EUROSAT_FOLDERS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def _fusionbench(task: str) -> dict:
    return runpy.run_path(str(FUSIONBENCH / f"{FUSIONBENCH_MODULES[task]}.py"))


def _prompts(templates, classnames) -> list[list[str]]:
    return [[template(name) for template in templates] for name in classnames]


def test_the_pool_is_fusionbenchs_ta8_in_its_order():
    modelpool = yaml.safe_load((FUSIONBENCH / "clip-vit-base-patch32_TA8.yaml").read_text())["models"]
    fusionbench_tasks = [name for name in modelpool if name != "_pretrained_"]
    assert set(fusionbench_tasks) == set(FUSIONBENCH_TASKS)
    pool = yaml.safe_load((REPO / "configs" / "paper" / "pools" / "fusionbench_ta8.yaml").read_text())
    assert pool["model"]["init_args"]["experts"] == [
        f"$SAFEMERGE_EXPERTS/{FUSIONBENCH_TASKS[t]}" for t in fusionbench_tasks
    ]
    assert {modelpool[t] for t in fusionbench_tasks} == {
        f"tanganke/clip-vit-base-patch32_{t}" for t in FUSIONBENCH_TASKS
    }


def test_the_recipe_downloads_and_converts_every_expert_of_the_pool():
    readme = (REPO / "README.md").read_text()
    recipe = readme[readme.index("### FusionBench's TA8 pool") :].split("\n## ", 1)[0]
    assert "openai/clip-vit-base-patch32" in recipe and "configs/paper/pools/fusionbench_ta8.yaml" in recipe
    for fusionbench, task in FUSIONBENCH_TASKS.items():
        assert f"tanganke/clip-vit-base-patch32_{fusionbench}" in recipe
        assert f"--task {task}" in recipe


@pytest.mark.parametrize("fusionbench", FUSIONBENCH_TASKS)
def test_class_names_and_prompts_are_fusionbenchs(fusionbench):
    published = _fusionbench(fusionbench)
    task = get_task(FUSIONBENCH_TASKS[fusionbench])
    assert list(task.classnames) == published["classnames"]  # same names, same label order
    assert [task.prompts(c) for c in task.classnames] == _prompts(published["templates"], published["classnames"])


@pytest.mark.parametrize("task_name", TASK_VECTORS_NAMES)
def test_templates_are_task_vectors(task_name):
    templates = runpy.run_path(str(DATA / "task_vectors_templates.py"))["dataset_to_template"][
        TASK_VECTORS_NAMES[task_name]
    ]
    task = get_task(task_name)
    assert [task.prompts(c) for c in task.classnames] == _prompts(templates, task.classnames)


def test_gtsrb_and_eurosat_class_names_are_task_vectors():
    """task_vectors publishes these two lists in its dataset code (the others come from folder names)."""
    published = runpy.run_path(str(DATA / "task_vectors_classnames.py"))
    assert list(get_task("gtsrb").classnames) == published["gtsrb_classnames"]
    eurosat = [published["ours_to_open_ai"][published["pretify_classname"](f)] for f in sorted(EUROSAT_FOLDERS)]
    assert list(get_task("eurosat").classnames) == eurosat
