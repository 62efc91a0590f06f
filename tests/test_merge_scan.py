"""The pre-merge scan inside a merge: its document in the report, and flagged experts' vectors
scaled before merging (their pseudo-labels still their own)."""

import pytest
import torch
from quick_pool import quick_pool

import safemerge.scan
from safemerge.errors import ConfigError
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS
from safemerge.io import read_expert
from safemerge.merging import ExpertLabelMerging, TaskArithmetic, task_arithmetic
from safemerge.models import load_clip
from safemerge.modules import MergeModule


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return quick_pool()


@pytest.fixture
def flag_second(monkeypatch):
    """A scan that flags the pool's second expert (the scan itself is tested in test_scan.py)."""

    def scan(paths, **_):
        experts = [
            {"path": str(p), "task": f"t{i}", "score": float(i == 1), "flagged": i == 1} for i, p in enumerate(paths)
        ]
        return {"format": "safemerge-scan/1", "threshold": 0.5, "experts": experts}

    monkeypatch.setattr(safemerge.scan, "scan_experts", scan)


def test_a_flagged_experts_vector_is_scaled_in_the_merge_and_the_scan_is_recorded(pool, flag_second):
    base = load_clip(MINI_MODEL, MINI_WEIGHTS).visual.state_dict()
    experts = [read_expert(p).encoder for p in pool]
    handled = [
        {k: base[k] + 0.25 * (v - base[k]) for k, v in e.items()} if i == 1 else e for i, e in enumerate(experts)
    ]
    module = MergeModule(pool, TaskArithmetic(0.4), output_dir=None, scan=True, flagged_scale=0.25)
    reference = task_arithmetic(base, handled, 0.4)
    merged = module.merged_weights()
    assert all(torch.allclose(merged[k].float(), reference[k].float(), atol=1e-6) for k in reference)
    assert module.scan["handled"] == [1] and module.scan["flagged_scale"] == 0.25
    # recorded but not acted on without flagged_scale
    plain = MergeModule(pool, TaskArithmetic(0.4), output_dir=None, scan=True)
    unhandled = task_arithmetic(base, experts, 0.4)
    assert plain.scan["handled"] == [] and plain.scan["experts"][1]["flagged"]
    assert all(torch.allclose(plain.merged_weights()[k].float(), unhandled[k].float(), atol=1e-6) for k in unhandled)


def test_a_learned_merge_scales_the_flagged_vector_but_labels_with_the_expert_as_fine_tuned(pool, flag_second):
    module = MergeModule(pool, ExpertLabelMerging(steps=1), output_dir=None, scan=True, flagged_scale=0.0)
    expert = read_expert(pool[1]).encoder
    own = module.encoder.expert_weights(1)
    assert all(torch.allclose(own[k].float(), expert[k].float(), atol=1e-5) for k in own)
    assert float(module.encoder.vectors(0)[1].abs().max()) == 0.0  # dropped from every merge


def test_flagged_scale_needs_the_scan_and_a_factor_in_0_1(pool):
    with pytest.raises(ConfigError, match="flagged_scale"):
        MergeModule(pool, TaskArithmetic(0.3), output_dir=None, flagged_scale=0.5)
    with pytest.raises(ConfigError, match="flagged_scale"):
        MergeModule(pool, TaskArithmetic(0.3), output_dir=None, scan=True, flagged_scale=2.0)
