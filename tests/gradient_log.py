"""A callback for the DDP tests: logs the gradients every optimizer step is about to take
(``--trainer.callbacks+=gradient_log.GradientLog``, with ``tests/`` on PYTHONPATH).

Adam divides a gradient by its own running scale, so learned tensors hardly change when every
gradient is multiplied by a constant (e.g. summed over 2 processes instead of averaged); the
gradients themselves do. Each rank writes ``<path>.<rank>.json``: per optimizer step, per
parameter, the sum of the gradient's entries and of their absolute values.
"""

import json

import lightning as L


class GradientLog(L.Callback):
    def __init__(self, path: str) -> None:
        self.path, self.steps = path, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.steps.append([[float(g.sum()), float(g.abs().sum())] for g in grads])

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.path}.{trainer.global_rank}.json", "w") as f:
            json.dump(self.steps, f)
