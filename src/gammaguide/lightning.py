"""Lightning: a ``Callback`` that attaches a ``gg.Monitor`` to the optimizer.

    trainer = L.Trainer(..., callbacks=[gammaguide.lightning.MonitorCallback()])

Importing this module needs Lightning (``lightning`` or the older ``pytorch_lightning``); the rest
of gammaguide does not.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import GammaGuideError
from .monitor import Monitor

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package of Lightning 1.x/2.x
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError("gammaguide.lightning needs Lightning: pip install lightning") from None


class MonitorCallback(Callback):
    """Monitors the ``LightningModule`` and its optimizer from the start of training.

    ``example_inputs`` default to the module's ``example_input_array``; ``total_steps`` is the
    trainer's ``estimated_stepping_batches``; ``optimizer``: which of ``configure_optimizers``'
    optimizers (its index). Each record's scalars go to the trainer's logger (``log=True``) at
    the trainer's global step, and the records to ``default_root_dir/jsonl`` (main process;
    ``jsonl=None``: nowhere) and ``callback.monitor.history``. Other keyword arguments go to
    ``Monitor`` (``every``, ``probe``, ``probe_every``, ``sinks``, thresholds).
    """

    def __init__(self, example_inputs: Any = None, *, jsonl: str | None = "gammaguide-monitor.jsonl",
                 log: bool = True, optimizer: int = 0, **options: Any):
        super().__init__()
        self.example_inputs, self.jsonl, self.log, self.optimizer_index = example_inputs, jsonl, log, optimizer
        self.options = options
        self.monitor: Monitor | None = None
        self._logged = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
        inputs = self.example_inputs
        if inputs is None:
            inputs = getattr(pl_module, "example_input_array", None)
        if inputs is None:
            raise GammaGuideError(f"MonitorCallback needs example inputs: set {type(pl_module).__name__}."
                                  f"example_input_array, or pass MonitorCallback(example_inputs=...)")
        if not trainer.optimizers or self.optimizer_index >= len(trainer.optimizers):
            raise GammaGuideError(f"MonitorCallback(optimizer={self.optimizer_index}): the trainer has "
                                  f"{len(trainer.optimizers)} optimizer(s)")
        total = trainer.estimated_stepping_batches
        options = {"total_steps": int(total) if isinstance(total, (int, float)) and 0 < total < float("inf")
                   else None, **self.options}
        sinks = list(options.pop("sinks", ()))
        if self.jsonl and trainer.is_global_zero:
            sinks.append(os.path.join(trainer.default_root_dir, self.jsonl))
        self.monitor = Monitor(pl_module, trainer.optimizers[self.optimizer_index], inputs, sinks=sinks, **options)
        self._logged = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = self.monitor
        if m is None or self._logged == len(m.history):
            return
        if self.log and trainer.logger is not None:
            for rec in m.history[self._logged:]:
                trainer.logger.log_metrics({f"gammaguide/{k}": v for k, v in rec.scalars().items()},
                                           step=trainer.global_step)
        self._logged = len(m.history)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
