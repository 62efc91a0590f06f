"""scripts/compare_methods.py (safemerge.protocol.runs): methods × options × pools × seeds, as trainer.py commands."""

import re
from pathlib import Path

import pytest

from safemerge.protocol import runs as compare_methods


def _commands(capsys, *argv):
    compare_methods.main(["--dry-run", *argv])
    return [line.split() for line in capsys.readouterr().out.splitlines() if "trainer.py" in line]


def _configs(command):
    return [
        Path(command[i + 1]).relative_to(compare_methods.CONFIGS).as_posix()
        for i, a in enumerate(command)
        if a == "--config"
    ]


def test_a_method_with_options_runs_base_pool_method_then_options_for_every_seed_and_pool(capsys):
    commands = _commands(
        capsys,
        "--methods",
        "task_arithmetic",
        "dam_task_arithmetic+patch_trigger+attribution_trim",
        "task_arithmetic+sau",
        "--pools",
        "mini_default",
        "mini_heldout_two",
        "--seeds",
        "0",
        "1",
        "--output",
        "out",
    )
    runs = [
        (
            _configs(c),
            next(a for a in c if a.startswith("--seed_everything")),
            next(a for a in c if a.startswith("--model.init_args.output_dir")),
        )
        for c in commands
    ]
    assert runs[0] == (
        ["merge/base.yaml", "pools/mini_default.yaml", "merge/task_arithmetic.yaml"],
        "--seed_everything=0",
        "--model.init_args.output_dir=out/mini_default/task_arithmetic/seed0",
    )
    assert runs[1][0] == [
        "merge/base.yaml",
        "pools/mini_default.yaml",
        "merge/dam_task_arithmetic.yaml",
        "dam/patch_trigger.yaml",
        "dam/attribution_trim.yaml",
    ]
    assert runs[4][0][-2:] == ["merge/task_arithmetic.yaml", "defense/sau.yaml"]
    # task arithmetic learns nothing: one seed; with a defence it learns: every seed
    assert len(commands) == 2 * (1 + 2 + 2)
    assert runs[5][2] == "--model.init_args.output_dir=out/mini_heldout_two/task_arithmetic/seed0"


def test_without_pools_the_base_config_pool_is_used(capsys):
    (command,) = _commands(capsys, "--methods", "ties", "--output", "out")
    assert _configs(command) == ["merge/base.yaml", "merge/ties.yaml"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "base"], "unknown method 'base'"),
        (["--methods", "ties+nope"], "unknown option 'nope' in 'ties+nope'"),
        (["--methods", "ties", "--pools", "nope"], "unknown pool 'nope'"),
    ],
)
def test_unknown_names_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit, match=re.escape(message)):
        compare_methods.main(["--dry-run", *argv])
    assert "trainer.py" not in capsys.readouterr().out


def test_the_all_clean_reference_is_read_per_pool_and_drawn_as_a_point(tmp_path, monkeypatch):
    import json

    from matplotlib.figure import Figure

    from safemerge.errors import ConfigError
    from safemerge.report import plot_asr_vs_accuracy

    entry = lambda acc, asr: {"task_arithmetic": {"0.3": {"average": {"accuracy": acc, "asr": asr}}}}  # noqa: E731
    path = tmp_path / "all_clean_reference.json"
    path.write_text(json.dumps({"pool_a": entry(0.6, 0.05), "pool_b": entry(0.7, 0.2)}))
    assert compare_methods.all_clean_points(path, ["pool_b", "pool_a"]) == {"pool_b": (0.7, 0.2), "pool_a": (0.6, 0.05)}
    with pytest.raises(ConfigError, match="no all-clean merge of pool 'pool_c'"):
        compare_methods.all_clean_points(path, ["pool_a", "pool_c"])

    drawn = {}
    savefig = Figure.savefig

    def record(self, *args, **kwargs):
        drawn.update({line.get_label(): line.get_xydata().tolist() for line in self.axes[0].get_lines()})
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    summary = {"ta": {"runs": 1, "average": {"accuracy": (0.6, 0.0), "asr": (0.5, 0.0)}}}
    plot_asr_vs_accuracy(summary, tmp_path / "plot.png", reference=(0.7, 0.2))
    assert drawn["all-clean reference"] == [[70.0, 20.0]]
