"""The grid's comparison table (scripts/paper_grid.py → comparison.md) holds the numbers of the
runs' reports: per method, every task's ACC and attacked task's ASR and the averages, as mean ± std
over seeds, recomputed here from the report.json files.

Fast: the grid over reports that already exist (it runs nothing and tabulates them). Slow: the
grid end to end on the mini pool (fine-tuning, a DAM merge), its table against its reports.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from safemerge.protocol import grid as paper_grid
from safemerge.report import build_report, write_report

REPO = Path(__file__).resolve().parents[1]

MINI_TASKS = ["mini_shapes", "mini_digits", "mini_fashion", "mini_textures", "mini_letters", "mini_terrain"]


def read_table(markdown: str) -> dict[str, dict[str, str]]:
    """``{method: {column: cell}}`` of a markdown table."""
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def cell(text: str) -> tuple[float, float | None] | None:
    """'63.2 ± 1.0' -> (63.2, 1.0); '63.2' -> (63.2, None); '—' -> None."""
    if text == "—":
        return None
    mean, _, std = text.partition("±")
    return float(mean), float(std) if std else None


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation, in points (%)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return 100 * mean, 100 * std


def assert_table_matches_reports(output: Path, methods: list[str]) -> None:
    table = read_table((output / "comparison.md").read_text())
    assert sorted(table) == sorted(methods)
    for method in methods:
        reports = [json.loads(p.read_text()) for p in sorted((output / method).glob("seed*/report.json"))]
        row = table[method]
        assert int(row["runs"]) == len(reports) > 0
        expected = {f"{t} ACC": [r["tasks"][t]["accuracy"] for r in reports] for t in reports[0]["tasks"]}
        expected |= {
            f"{t} ASR": [r["tasks"][t]["asr"] for r in reports]
            for t in reports[0]["tasks"]
            if reports[0]["tasks"][t]["asr"] is not None
        }
        expected |= {
            "avg ACC": [r["average"]["accuracy"] for r in reports],
            "avg ASR": [r["average"]["asr"] for r in reports],
            "avg norm. ACC": [r["average"]["normalized_accuracy"] for r in reports],
        }
        for column, values in expected.items():
            mean, std = mean_std(values)
            shown = cell(row[column])
            assert shown is not None and shown[0] == pytest.approx(mean, abs=0.051), (method, column, row[column], mean)
            if len(reports) > 1:
                assert shown[1] == pytest.approx(std, abs=0.051), (method, column, row[column], std)


def _report(method: str, seed: int) -> dict:
    """A report with numbers that differ per method, seed and task (ASR on the attacked task)."""
    results = {}
    for i, task in enumerate(MINI_TASKS):
        accuracy = 0.5 + 0.05 * i + 0.013 * seed * (i + 1) + (0.1 if method == "dam_task_arithmetic" else 0.0)
        attacked = task == "mini_letters"
        asr = 0.9 - 0.2 * seed - 0.31 * (method != "task_arithmetic")
        results[task] = {
            "accuracy": accuracy,
            "asr": asr if attacked else None,
            "target_rate": 0.1 if attacked else None,
            "expert_accuracy": 0.9 - 0.01 * i,
        }
    return build_report(method, results, config={"seed": seed}, runtime_s=1.0)


def test_the_grid_tabulates_its_runs_reports_mean_and_std_over_seeds(tmp_path, capsys):
    experts = tmp_path / "experts" / "MiniCLIP-ViT"
    for name in [*MINI_TASKS, "mini_letters-badnets"]:  # present: nothing is fine-tuned
        (experts / name).mkdir(parents=True)
        (experts / name / "expert.json").write_text("{}")
    output = tmp_path / "out" / "MiniCLIP-ViT" / "mini" / "badnets"
    methods = ["dam_task_arithmetic", "task_arithmetic", "adamerging"]
    for method in methods:
        for seed in paper_grid.seeds_of([paper_grid.PAPER / "methods" / f"{method}.yaml"], [0, 1, 2]):
            write_report(output / method / f"seed{seed}", _report(method, seed))
    paper_grid.main(
        [
            "--experts",
            str(tmp_path / "experts"),
            "--model",
            "MiniCLIP-ViT",
            "--pretrained",
            "mini2",
            "--pool",
            "mini",
            "--attack",
            "badnets",
            "--adversary",
            "mini_letters",
            "--methods",
            *methods,
            "--seeds",
            "0",
            "1",
            "2",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert "table:" in capsys.readouterr().out
    assert_table_matches_reports(output, methods)
    table = read_table((output / "comparison.md").read_text())
    assert table["task_arithmetic"]["runs"] == "1" and table["adamerging"]["runs"] == "3"  # static methods run once
    assert cell(table["adamerging"]["mini_letters ASR"])[1] > 10  # the seeds' spread is shown, not hidden


TWO_STEPS_FINETUNE = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.batch_size=16",
    "--trainer.precision=32",
    "--data.init_args.num_workers=0",
]


@pytest.mark.slow  # fine-tunes seven experts and merges: minutes on 2 cores
def test_paper_grid_runs_end_to_end_on_the_mini_pool_and_tabulates_its_reports(tmp_path):
    """The same code path as the paper grid, on the mini pool: fine-tune six experts and a
    backdoored one (few steps), merge with DAM (two steps), write the table and plot; the
    table's numbers are the report's."""
    command = [
        sys.executable,
        str(REPO / "scripts" / "paper_grid.py"),
        "--experts",
        str(tmp_path / "experts"),
        "--model",
        "MiniCLIP-ViT",
        "--pretrained",
        "mini2",
        "--pool",
        "mini",
        "--attack",
        "badnets",
        "--adversary",
        "mini_letters",
        "--methods",
        "dam_task_arithmetic",
        "--seeds",
        "0",
        "--output",
        str(tmp_path / "out"),
        "--finetune-args",
        " ".join(TWO_STEPS_FINETUNE),
        "--merge-args",
        (
            "--model.init_args.method.init_args.steps=2 --trainer.precision=32 "
            "--trainer.logger=false --data.init_args.num_workers=0"
        ),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out" / "MiniCLIP-ViT" / "mini" / "badnets"  # <model>/<pool>/<attack>
    assert (out / "asr_vs_accuracy.png").is_file()
    assert_table_matches_reports(out, ["dam_task_arithmetic"])
    assert sorted(p.name for p in (tmp_path / "experts" / "MiniCLIP-ViT").iterdir()) == sorted(
        [*MINI_TASKS, "mini_letters-badnets"]
    )
