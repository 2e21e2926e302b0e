"""Hugging Face ``Trainer`` with weight decay decided by gammaguide.

``Trainer`` puts ``args.weight_decay`` on the names ``get_decay_parameter_names`` returns
and 0 on the rest, for whichever ``args.optim`` is chosen; ``GammaGuideTrainer`` only
changes which names those are. ``hf_optimizers`` builds the ``optimizers=`` pair instead,
for a ``Trainer`` subclass you cannot change. ``MonitorCallback`` attaches a ``gg.Monitor``
to any ``Trainer``'s optimizer.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler

from .analysis import analyze
from .errors import GammaGuideError
from .groups import param_groups
from .inputs import unwrap
from .monitor import Monitor
from .policy import Policy
from .report import Report


class GammaGuideTrainer(Trainer):
    """A ``Trainer`` whose optimizer decays what ``policy`` decides.

    ``example_inputs`` is a batch of keyword inputs for the model; without it, the first
    example of ``train_dataset`` is collated into one. The analysis is kept in ``gg_report``.
    """

    def __init__(self, *args: Any, example_inputs: Any = None,
                 policy: str | Mapping[str, bool] | Policy = "guidelines", **kwargs: Any):
        self.gg_example_inputs = example_inputs
        self.gg_policy = policy
        self.gg_report: Report | None = None
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        inputs = self.gg_example_inputs
        if inputs is None:
            inputs = _first_batch(self, model)
        self.gg_report = analyze(model, inputs, self.gg_policy)
        return [p.name for p in self.gg_report.params if p.decay]


def hf_optimizers(model: nn.Module, args: TrainingArguments, num_training_steps: int, example_inputs: Any,
                  policy: str | Mapping[str, bool] | Policy = "guidelines") -> tuple[torch.optim.Optimizer, Any]:
    """``(optimizer, lr_scheduler)`` for ``Trainer(optimizers=...)``: the optimizer and schedule
    ``args`` asks for (``args.optim``, ``args.lr_scheduler_type``, warm-up), with guideline groups."""
    cls, options = Trainer.get_optimizer_cls_and_kwargs(args, model)
    builds_own = [k for k in ("params", "model", "optimizer_dict") if k in options]
    if builds_own or not isinstance(cls, type) or not issubclass(cls, torch.optim.Optimizer):
        raise GammaGuideError(
            f"args.optim={args.optim!r} builds its own parameter groups, so gammaguide cannot set them; use an "
            f"optimizer such as adamw_torch, or GammaGuideTrainer"
        )
    optimizer = cls(param_groups(model, args.weight_decay, example_inputs, policy), **options)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return optimizer, scheduler


class MonitorCallback(TrainerCallback):
    """Attaches a ``gg.Monitor`` to the Trainer's optimizer when training begins:

        trainer = Trainer(..., callbacks=[MonitorCallback()])

    ``example_inputs`` (keyword inputs of the model) default to the first training example,
    collated as the Trainer collates it (the sampler is not touched); ``total_steps`` is the
    Trainer's ``max_steps``. The records go to ``args.output_dir/jsonl`` as they come (on the
    main process; ``jsonl=None``: nowhere), and are in ``callback.monitor.history``. Other keyword
    arguments go to ``Monitor`` (``every``, ``probe``, ``probe_every``, ``sinks``, thresholds).
    """

    def __init__(self, example_inputs: Any = None, *, jsonl: str | None = "gammaguide-monitor.jsonl",
                 **options: Any):
        self.example_inputs, self.jsonl, self.options = example_inputs, jsonl, options
        self.monitor: Monitor | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self.monitor is not None:
            self.monitor.close()  # a second train() call: start afresh on its optimizer
        inputs = self.example_inputs
        if inputs is None:
            if train_dataloader is None:
                raise GammaGuideError("MonitorCallback got no train_dataloader to take an example from; pass "
                                      "MonitorCallback(example_inputs={'input_ids': ..., 'attention_mask': ...})")
            inputs = _example_batch(train_dataloader.dataset, train_dataloader.collate_fn, model,
                                    "pass MonitorCallback(example_inputs={'input_ids': ..., ...})")
        options = {"total_steps": state.max_steps if state.max_steps and state.max_steps > 0 else None,
                   **self.options}
        sinks = list(options.pop("sinks", ()))
        if self.jsonl and state.is_world_process_zero:
            sinks.append(os.path.join(args.output_dir, self.jsonl))
        self.monitor = Monitor(model, optimizer, inputs, sinks=sinks, **options)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()


def _first_batch(trainer: Trainer, model: nn.Module) -> dict:
    """The first training example, reduced to what ``model.forward`` accepts and collated
    as the Trainer collates (without touching the sampler, so shuffling is unchanged)."""
    return _example_batch(trainer.train_dataset, trainer.data_collator, model,
                          "pass example_inputs={'input_ids': ..., 'attention_mask': ...} to GammaGuideTrainer")


def _example_batch(dataset: Any, collate: Any, model: nn.Module, advice: str) -> dict:
    accepted = set(inspect.signature(unwrap(model).forward).parameters) | {"label", "label_ids"}
    try:
        example = {k: v for k, v in dataset[0].items() if k in accepted}
        batch = dict(collate([example])) if example else {}
    except Exception as exc:
        raise GammaGuideError(
            f"could not build an example batch from train_dataset[0] ({type(exc).__name__}: {exc}); {advice}"
        ) from exc
    if not batch:
        raise GammaGuideError(f"train_dataset[0] holds none of the inputs {type(model).__name__} accepts; {advice}")
    return batch
