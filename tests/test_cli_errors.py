"""What a new user sees: one error: line for a config that fails validation, missing data before
any fine-tuning, one line per expert, and a short learned merge that just runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safemerge import cli
from safemerge.cli import main
from safemerge.data import mini_assets, mini_v2  # noqa: F401  (mini_v2 lists its assets at import: import it before a test patches one)

REPO = Path(__file__).resolve().parents[1]
MERGE = REPO / "configs"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["trainer.py"])
    monkeypatch.chdir(tmp_path)


def _error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_method_file_without_its_base_says_to_add_the_base(capsys, tmp_path):
    line = _error(["fit", "--config", str(MERGE / "merge" / "task_arithmetic.yaml")], capsys)
    assert "add --config configs/merge/base.yaml first" in line
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_option_is_one_line_naming_it(capsys):
    line = _error(
        [
            "fit",
            "--config",
            str(MERGE / "merge" / "base.yaml"),
            "--config",
            str(MERGE / "merge" / "ties.yaml"),
            "--model.init_args.method.init_args.scaling_factr=2",
        ],
        capsys,
    )
    assert "Option 'scaling_factr' is not accepted" in line and "usage" not in line


def test_missing_pool_data_fails_before_any_expert_is_fine_tuned(monkeypatch, capsys, tmp_path):
    def must_not_run(references, accelerator="auto"):
        raise AssertionError(f"fine-tuning started for {references}")

    monkeypatch.setattr(cli, "resolve_experts", must_not_run)
    monkeypatch.setattr(mini_assets, "GLYPH_ASSET", tmp_path / "gone.npz")  # mini_letters' glyphs: 5th expert
    mini_assets.glyphs.cache_clear()
    try:
        line = _error(["fit", "--config", str(MERGE / "merge.yaml")], capsys)
    finally:
        mini_assets.glyphs.cache_clear()
    assert "gone.npz is missing from the safemerge package" in line


def test_the_run_prints_one_line_per_expert_given_or_from_the_cache(monkeypatch, capsys, tmp_path):
    """Under the CLI, safemerge's INFO lines reach stdout bare: a given directory's line here (the
    cached / fine-tuned lines are pinned in tests/test_expert_cache.py), and nothing of the root logger."""
    import logging

    directory = tmp_path / "letters"
    directory.mkdir()
    (directory / "expert.json").write_text(
        json.dumps(
            {
                "task": "mini_letters",
                "backdoor": {"attack": "badnets", "target_class": 0},
                "metrics": {"accuracy": 0.912, "asr": 0.99},
            }
        )
    )
    monkeypatch.setattr(logging.getLogger("safemerge"), "handlers", [])
    cli._log_to_stdout()
    cli._log_to_stdout()  # once only
    assert cli.resolve_pool([str(directory)]) == [str(directory)]
    logging.getLogger("lightning.some.module").info("third-party info")
    captured = capsys.readouterr()
    assert captured.err == ""  # stderr is for errors
    lines = captured.out.splitlines()
    assert lines == [f"expert mini_letters (badnets -> class 0): given {directory}, accuracy 91.2 %, ASR 99.0 %"]


@pytest.mark.slow
def test_a_short_learned_merge_just_runs_and_says_what_it_does(tmp_path):
    """AdaMerging for fewer steps than base.yaml's val_check_interval (100), then SAU, through
    ``python trainer.py`` as a user runs it: no Lightning error, the stages and the report's
    place are said, and the known harmless noise is gone."""
    from safemerge.experts import MINI_MODEL, MINI_WEIGHTS, ExpertSpec, ensure_expert

    quick = {"lr": 1e-4, "max_steps": 10, "warmup_steps": 2, "batch_size": 32}
    off_task = {
        "class_path": "safemerge.attacks.BadNets",
        "init_args": {"target_class": 1, "target_task": "mini_shapes", "poison_rate": 0.2, "size": 0.125},
    }
    pool = [
        ensure_expert(ExpertSpec("mini_shapes", MINI_MODEL, MINI_WEIGHTS, **quick), accelerator="cpu"),
        ensure_expert(
            ExpertSpec("mini_letters", MINI_MODEL, MINI_WEIGHTS, attack=off_task, **quick), accelerator="cpu"
        ),
    ]
    command = [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        "--config",
        str(MERGE / "merge" / "base.yaml"),
        "--config",
        str(MERGE / "merge" / "adamerging.yaml"),
        "--config",
        str(MERGE / "defense" / "sau.yaml"),
        "--model.init_args.experts=[" + ",".join(map(str, pool)) + "]",
        "--model.init_args.method.init_args.adamerging_steps=3",
        "--model.init_args.defense.init_args.steps=2",
        f"--model.init_args.output_dir={tmp_path / 'out'}",
        "--data.init_args.eval_batch_size=250",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    for line in (
        "expert mini_shapes (clean): given",
        "merging: AdaMerging coefficients, 3 steps",
        "defence: SAU defense, 2 steps",
        "evaluating: AdaMerging (layer-wise) + SAU",
        f"report written to {tmp_path / 'out' / 'report.md'}",
    ):
        assert line in output
    for noise in ("💡 Tip", "in eval mode", "does not have many workers", "anonymous setting", "is deprecated"):
        assert noise not in output
    assert (tmp_path / "out" / "report.md").read_text().startswith("# AdaMerging (layer-wise) + SAU\n")
