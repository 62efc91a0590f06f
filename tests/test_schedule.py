"""The warm-up + cosine learning-rate schedule, against the formula by hand."""

import math

import pytest
import torch

from safemerge.modules.schedule import warmup_cosine


def test_warmup_then_cosine_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)["scheduler"]
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert rates == pytest.approx(expected)
