"""Merging functions against hand computations."""

import pytest
import torch

from safemerge.merging import task_arithmetic, task_vectors, weight_average

BASE = {"w": torch.tensor([1.0, 2.0, 3.0]), "steps": torch.tensor(7)}
A = {"w": torch.tensor([2.0, 2.0, 1.0]), "steps": torch.tensor(7)}
B = {"w": torch.tensor([1.0, 4.0, 3.5]), "steps": torch.tensor(7)}


def test_task_vectors_are_differences_of_float_tensors():
    tau_a, tau_b = task_vectors(BASE, [A, B])
    assert torch.equal(tau_a["w"], torch.tensor([1.0, 0.0, -2.0]))
    assert torch.equal(tau_b["w"], torch.tensor([0.0, 2.0, 0.5]))
    assert "steps" not in tau_a  # integer buffers are not merged


def test_task_arithmetic_by_hand():
    merged = task_arithmetic(BASE, [A, B], scaling=0.5)
    # 1 + .5*(1+0), 2 + .5*(0+2), 3 + .5*(-2+.5)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 3.0, 2.25]))
    assert merged["steps"].item() == 7
    per_expert = task_arithmetic(BASE, [A, B], scaling=[1.0, 0.0])
    assert torch.equal(per_expert["w"], A["w"])


def test_weight_average_by_hand():
    assert torch.allclose(weight_average([A, B])["w"], torch.tensor([1.5, 3.0, 2.25]))


def test_mismatched_experts_are_rejected():
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        task_vectors(BASE, [{"w": torch.zeros(2), "steps": torch.tensor(7)}])
    with pytest.raises(ValueError, match="missing \\['steps'\\]"):
        task_vectors(BASE, [{"w": torch.zeros(3)}])
