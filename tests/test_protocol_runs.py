"""safemerge.protocol.runs: how often a merge runs is read from its method's class, not a list."""

from pathlib import Path

import pytest

from safemerge.merging import StaticMerge
from safemerge.protocol.runs import BASE, learns, method_configs, seeds_of

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Halfway(StaticMerge):
    """A static method that only this test knows: no script lists it."""

    name = "halfway"


@pytest.mark.parametrize(
    "method, once",
    [
        ("weight_average", True),
        ("task_arithmetic", True),
        ("ties", True),
        ("adamerging", False),
        ("concrete_task_arithmetic", False),
        ("dam_adamerging", False),
        ("task_arithmetic+sau", False),
        ("ties+awm+expert_labels", False),  # a defence learns, on any method
    ],
)
def test_a_merge_that_learns_nothing_runs_for_one_seed(method, once):
    seeds = seeds_of([BASE, *method_configs(method)], [0, 1, 2])
    assert list(seeds) == ([0] if once else [0, 1, 2])


def test_a_new_static_method_is_recognised_from_its_class_path(tmp_path):
    config = tmp_path / "halfway.yaml"
    config.write_text(f"model:\n  init_args:\n    method:\n      class_path: {__name__}.Halfway\n")
    assert not learns([BASE, config])
    defended = tmp_path / "defended.yaml"
    defended.write_text("model:\n  init_args:\n    defense:\n      class_path: safemerge.defenses.SAU\n")
    assert learns([BASE, config, defended])
