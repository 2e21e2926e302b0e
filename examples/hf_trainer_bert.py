"""BERT fine-tuning with the Hugging Face Trainer and guideline weight decay.

    python examples/hf_trainer_bert.py

``GammaGuideTrainer`` is a ``Trainer`` whose optimizer decays what gammaguide decides
(``args.weight_decay`` on those parameters, 0 on the rest) for any ``args.optim``, and
``MonitorCallback`` (one added line, any ``Trainer``) records per role the mean |γ| and the
effective learning rate lr/‖γ‖², and var(branch)/var(skip) at every residual sum, to
``output_dir/gammaguide-monitor.jsonl`` (draw it with ``gammaguide monitor FILE --out DIR``).
Here a tiny BERT built from a config learns a synthetic task offline; with a real checkpoint use
``BertForSequenceClassification.from_pretrained(...)`` and a tokenized dataset instead.
"""

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from gammaguide.hf import GammaGuideTrainer, MonitorCallback


class Synthetic(torch.utils.data.Dataset):
    """Label = whether token 1 occurs in the sequence."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def build_trainer(output_dir: str, max_steps: int = 40, monitor: bool = True, every: int = 5) -> GammaGuideTrainer:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3,
        weight_decay=0.01, logging_steps=max(1, max_steps // 4), save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    # No example_inputs: the first training example is collated into one (for the monitor too).
    callbacks = [MonitorCallback(every=every, probe_every=2 * every)] if monitor else []
    return GammaGuideTrainer(model=model, args=args, train_dataset=Synthetic(), callbacks=callbacks)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(tmp)
        trainer.train()
        monitor = next(c for c in trainer.callback_handler.callbacks if isinstance(c, MonitorCallback)).monitor
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        layer_norms = sum("LayerNorm.weight" in names[id(p)] for p in group["params"])
        print(f"weight_decay={group['weight_decay']:<5g} {len(group['params']):>3} tensors "
              f"({layer_norms} LayerNorm γ)")
    print("roles:", {r: len(es) for r, es in trainer.gg_report.by_role().items() if es})
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    first, last = monitor.history[0], monitor.history[-1]
    for role, s in last.roles.items():
        print(f"{role:<9} mean |γ| {first.roles[role].gamma_abs:.3f} -> {s.gamma_abs:.3f}, "
              f"lr/‖γ‖² {s.eff_lr:.2e}, {s.decayed}/{s.count} decayed")
    print("var(branch)/var(skip) at step", last.step, {k: round(v, 3) for k, v in last.variance.items()})


if __name__ == "__main__":
    main()
