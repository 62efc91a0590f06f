"""A callback for the resume tests: the process sends itself a signal once ``steps`` adaptation
steps are done (``--trainer.callbacks+=interrupt.SignalAfter``, with ``tests/`` on PYTHONPATH),
so a run is interrupted at a known step by a real SIGTERM (saved, then a clean exit) or SIGKILL
(nothing saved: the run resumes from its last periodic checkpoint)."""

import os
import signal

import lightning as L


class SignalAfter(L.Callback):
    def __init__(self, steps: int, signal_name: str = "SIGTERM") -> None:
        self.steps, self.signal = steps, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 == self.steps:
            os.kill(os.getpid(), self.signal)
