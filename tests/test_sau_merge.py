"""SAU, the shipped defence, trained through MergeModule and the CLI: with expert pseudo-labels
under DDP (2 gloo processes learn what 1 process learns, gradient for gradient), and resumed
after a SIGTERM inside the defence. The merge is AdaMerging (2 λ steps) + SAU (one attack
step, expert labels: the default job's composition) on a quick 3-expert mini pool."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from quick_pool import quick_pool

from safemerge.io import load_tensors

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

DEFENSE_STEPS = 3


@pytest.fixture(scope="module")
def pool() -> list[str]:
    """The shared quick pool (tests/quick_pool.py)."""
    return quick_pool()


def _command(pool, out: Path, *extra: str) -> list[str]:
    configs = [
        CONFIGS / "merge" / "base.yaml",
        CONFIGS / "merge" / "adamerging.yaml",
        CONFIGS / "defense" / "sau.yaml",
        CONFIGS / "defense" / "expert_labels.yaml",
        CONFIGS / "defense" / "one_attack_step.yaml",
    ]
    return [
        sys.executable,
        str(REPO / "trainer.py"),
        "fit",
        *(a for c in configs for a in ("--config", str(c))),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger=false",
        "--model.init_args.experts=[" + ",".join(pool) + "]",
        "--trainer.accelerator=cpu",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--trainer.limit_test_batches=1",
        "--model.init_args.method.init_args.adamerging_steps=2",
        f"--model.init_args.defense.init_args.steps={DEFENSE_STEPS}",
        "--data.init_args.batch_size=4",
        f"--model.init_args.output_dir={out}",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def _run(pool, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}  # for the callbacks in tests/
    return subprocess.run(
        _command(pool, out, *extra), capture_output=True, text=True, timeout=900, cwd=out.parent, env=env
    )


def _fit(pool, out: Path, *extra: str) -> Path:
    log = out.parent / f"{out.name}-gradients"
    callback = f'--trainer.callbacks+={{"class_path": "gradient_log.GradientLog", "init_args": {{"path": "{log}"}}}}'
    result = _run(pool, out, callback, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    return log


def _gradients(log: Path, rank: int) -> list:
    return json.loads(Path(f"{log}.{rank}.json").read_text())


@pytest.fixture(scope="module")
def single(pool, tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted single-process run (its output folder and gradient log), the reference
    of both tests below (the gradient log does not change what is learned)."""
    out = tmp_path_factory.mktemp("single") / "out"
    return out, _fit(pool, out)


def test_ddp_sau_with_expert_labels_takes_the_single_process_gradients_and_learns_the_same_mask(pool, single, tmp_path):
    """Two gloo processes with 2 images per task each take, at every step, the gradient that one
    process takes on the same 4 images per task (an average over ranks: a sum would double it),
    and learn the same λ and SAU mask."""
    single_out, single_log = single
    ddp_log = _fit(pool, tmp_path / "ddp", "--trainer.strategy=ddp", "--trainer.devices=2")
    single, ddp = _gradients(single_log, 0), _gradients(ddp_log, 0)
    assert len(single) == 2 + DEFENSE_STEPS  # one optimizer step per adaptation step (λ, then the mask)
    assert ddp == _gradients(ddp_log, 1)  # every rank steps with the same (reduced) gradient
    for step, (ours, theirs) in enumerate(zip(single, ddp)):
        assert len(ours) == len(theirs) and all(magnitude > 0 for _, magnitude in ours), step
        for (total, magnitude), (ddp_total, ddp_magnitude) in zip(ours, theirs):
            assert ddp_magnitude == pytest.approx(magnitude, rel=1e-3), step
            assert ddp_total == pytest.approx(total, rel=1e-3, abs=1e-3 * magnitude), step
    learned, learned_ddp = (load_tensors(d / "learned.safetensors") for d in (single_out, tmp_path / "ddp"))
    assert learned.keys() == learned_ddp.keys() and "defense_parts.masked_update.mask.0" in learned
    mask = learned["defense_parts.masked_update.mask.0"]
    assert not torch.equal(mask, torch.ones_like(mask))  # SAU moved its mask
    for name in learned:
        assert torch.allclose(learned[name], learned_ddp[name], rtol=1e-4, atol=5e-5), name
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["config"]["world_size"] == 2
    assert report["defense"]["name"] == "sau"
    params = report["defense"]["params"]
    assert params["pseudo_labels"] == "experts" and params["attack_steps"] == 1


STOP = (
    '--trainer.callbacks+={{"class_path": "interrupt.SignalAfter", '
    '"init_args": {{"steps": {steps}, "signal_name": "SIGTERM"}}}}'
)


def _outcome(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    report = json.loads((out / "report.json").read_text())
    report.pop("runtime_s")
    return load_tensors(out / "learned.safetensors"), report


@pytest.mark.slow  # two more merges (~90 s here); the fast AWM resume tests cover the shared Defense.resumed path
def test_sau_interrupted_inside_the_defence_resumes_with_ckpt_path_last_to_the_uninterrupted_result(
    pool, single, tmp_path
):
    """SIGTERM after 3 of 5 steps (2 λ steps, then 1 of 3 SAU steps: the mask and its Adam
    moments under way, Δ not stored), then ``--ckpt_path last``: every learned tensor and the
    report equal an uninterrupted run's."""
    uninterrupted, _ = single
    out = tmp_path / "out"
    interrupted = _run(pool, out, STOP.format(steps=3))
    assert interrupted.returncode == 143, interrupted.stderr[-4000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["safemerge"]["completed_steps"] == 3
    assert not (out / "report.json").exists()
    mask = checkpoint["state_dict"]["defense_parts.masked_update.mask.0"]
    assert not torch.equal(mask, torch.ones_like(mask))  # interrupted with the mask under way

    resumed = _run(pool, out, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    (learned, report), (expected, expected_report) = _outcome(out), _outcome(uninterrupted)
    assert learned.keys() == expected.keys() and int(learned["completed_steps"]) == 2 + DEFENSE_STEPS
    difference = max(float((learned[k].float() - expected[k].float()).abs().max()) for k in expected)
    assert difference <= 1e-6, difference
    assert report == expected_report
