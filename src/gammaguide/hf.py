"""Hugging Face ``Trainer`` with weight decay decided by gammaguide.

``Trainer`` puts ``args.weight_decay`` on the names ``get_decay_parameter_names`` returns
and 0 on the rest, for whichever ``args.optim`` is chosen; ``GammaGuideTrainer`` only
changes which names those are. ``hf_optimizers`` builds the ``optimizers=`` pair instead,
for a ``Trainer`` subclass you cannot change.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, get_scheduler

from .analysis import analyze
from .errors import GammaGuideError
from .groups import param_groups
from .inputs import unwrap
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


def _first_batch(trainer: Trainer, model: nn.Module) -> dict:
    """The first training example, reduced to what ``model.forward`` accepts and collated
    as the Trainer collates (without touching the sampler, so shuffling is unchanged)."""
    accepted = set(inspect.signature(unwrap(model).forward).parameters) | {"label", "label_ids"}
    advice = "pass example_inputs={'input_ids': ..., 'attention_mask': ...} to GammaGuideTrainer"
    try:
        example = {k: v for k, v in trainer.train_dataset[0].items() if k in accepted}
        batch = dict(trainer.data_collator([example])) if example else {}
    except Exception as exc:
        raise GammaGuideError(
            f"could not build an example batch from train_dataset[0] ({type(exc).__name__}: {exc}); {advice}"
        ) from exc
    if not batch:
        raise GammaGuideError(f"train_dataset[0] holds none of the inputs {type(model).__name__} accepts; {advice}")
    return batch
