"""ASR and accuracy against hand computations, and exact under two processes (gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safemerge.metrics import AttackSuccessRate, attack_success_rate, task_accuracy

# Triggered images, target class 2. True labels and predictions, by hand:
#   y:  0 1 2 2 3 0 1 3
#   ŷ:  2 2 2 0 3 2 1 2
# Eligible (y != 2): indices 0,1,4,5,6,7 -> 6 samples; sent to class 2: 0,1,5,7 -> 4.
LABELS = torch.tensor([0, 1, 2, 2, 3, 0, 1, 3])
PREDS = torch.tensor([2, 2, 2, 0, 3, 2, 1, 2])
HAND_ASR = 4 / 6


def test_asr_matches_hand_computation_and_excludes_target_class():
    metric = AttackSuccessRate(target_class=2)
    metric.update(PREDS, LABELS)
    assert metric.compute().item() == pytest.approx(HAND_ASR)
    # Counting the target-class samples would give 5/8, which is not the definition.
    assert metric.compute().item() != pytest.approx(5 / 8)


def test_asr_accepts_logits_and_accumulates_batches():
    logits = torch.nn.functional.one_hot(PREDS, 4).float() * 3.0
    metric = AttackSuccessRate(target_class=2)
    metric.update(logits[:3], LABELS[:3])
    metric.update(logits[3:], LABELS[3:])
    assert metric.compute().item() == pytest.approx(HAND_ASR)
    assert attack_success_rate(logits, LABELS, 2).item() == pytest.approx(HAND_ASR)


def test_asr_is_nan_without_eligible_samples():
    metric = AttackSuccessRate(target_class=1)
    metric.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
    assert torch.isnan(metric.compute())


def test_accuracy_is_top1_over_all_samples():
    metric = task_accuracy(4)
    metric.update(PREDS, LABELS)
    assert metric.compute().item() == pytest.approx(3 / 8)  # correct at indices 2, 4 and 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _asr_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = AttackSuccessRate(target_class=2)
        # Uneven shards: rank 0 sees 3 samples, rank 1 sees 5.
        shard = slice(0, 3) if rank == 0 else slice(3, 8)
        metric.update(PREDS[shard], LABELS[shard])
        results[rank] = metric.compute().item()
    finally:
        dist.destroy_process_group()


def test_asr_is_exact_under_two_processes():
    port = _free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_asr_worker, args=(2, port, results), nprocs=2, join=True)
        values = dict(results)
    # Each rank alone would give 2/2 and 2/4; the synced metric is the global 4/6 on both.
    assert values[0] == pytest.approx(HAND_ASR)
    assert values[1] == pytest.approx(HAND_ASR)
