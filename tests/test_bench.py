"""The prepared benchmark commands run (on a CPU, with the tiny architecture), so that the GPU
run and the memory table can be redone without surprises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_memory_projection_runs_and_adds_up(tmp_path):
    out = tmp_path / "memory.json"
    _run(
        str(REPO / "bench" / "memory.py"),
        "--models",
        "TinyCLIP-ViT-32",
        "--image-size",
        "32",
        "--tasks",
        "2,4",
        "--out",
        str(out),
        cwd=REPO,
    )
    result = json.loads(out.read_text())
    tower = result["towers"]["TinyCLIP-ViT-32"]
    per_image, per_forward = tower["act_fp32"]
    assert tower["parameters"] > 0 and per_image > 0 and per_forward >= 0
    rows = {(r["method"], r["T"]): r for r in result["projections"]}
    # two more task vectors cost exactly 2 P float32 values; checkpointing never costs memory
    assert rows["dam", 4]["state_gb"] - rows["dam", 2]["state_gb"] == pytest.approx(2 * 4 * tower["parameters"] / 1e9)
    for row in rows.values():
        assert row["bf16-mixed, bf16 τ, checkpoint_chunk 16"] <= row["bf16-mixed, bf16 τ"] <= row["bf16-mixed"]


@pytest.mark.slow
def test_gpu_figures_script_runs_on_a_cpu_with_the_tiny_model(tmp_path):
    _run(str(REPO / "bench" / "gpu.py"), "--tiny", "--threads", "1", "--out", str(tmp_path / "gpu"), cwd=REPO)
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["precision"] for r in result["rows"]] == ["fp32", "bf16-mixed"]
    for row in result["rows"]:
        assert row["merged_over_floor"] > 0 and row["dam_step_s"] > 0 and row["paper_dam_merge_h"] > 0
        assert set(row["peak_mb"]) == {"floor", "ours", "ours_lambda", "dam"}
    assert "merged / floor (target ≤ 1.1)" in (tmp_path / "gpu.md").read_text()
