"""Lightning with guideline weight decay: build the groups in ``configure_optimizers``.

    python examples/lightning_resnet.py

``example_input_array`` is Lightning's own attribute for a sample batch; gammaguide traces
the model with it. ``gammaguide.lightning.MonitorCallback`` (one added line) records per role the
mean |γ| and the effective learning rate lr/‖γ‖², and var(branch)/var(skip) at every residual
sum, to the trainer's logger and ``default_root_dir/gammaguide-monitor.jsonl``. Random 32x32
images stand in for CIFAR-10 so that the example runs offline.
"""

import lightning as L
import torch
from torch.nn import functional as F

import gammaguide as gg
from gammaguide.lightning import MonitorCallback
from gammaguide.models import create_model


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-4, epochs: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model("resnet20")
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        groups = gg.param_groups(self.model, self.hparams.weight_decay, self.example_input_array)
        optimizer = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9, nesterov=True)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def random_images(n: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    data = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=g)


def make_trainer(root: str, max_steps: int, monitor: bool = True, every: int = 2, logger=False) -> L.Trainer:
    # The probe: a fixed batch of real inputs (example_input_array is zeros: no variance to measure).
    probe = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    callbacks = [MonitorCallback(every=every, probe_every=2 * every, probe=probe)] if monitor else []
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, default_root_dir=root, logger=logger,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks)


def main() -> None:
    import tempfile

    module = Classifier()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(tmp, max_steps=8)
        trainer.fit(module, random_images())
    monitor = next(c for c in trainer.callbacks if isinstance(c, MonitorCallback)).monitor
    names = {id(p): n for n, p in module.model.named_parameters()}
    for group in module.trainer.optimizers[0].param_groups:
        print(f"{group['name']:<9} weight_decay={group['weight_decay']:<7g} {len(group['params']):>3} tensors, e.g. "
              f"{', '.join(names[id(p)] for p in group['params'][:3])}")
    last = monitor.history[-1]
    print(f"step {last.step}: " + ", ".join(f"|γ| {r} {s.gamma_abs:.3f}" for r, s in last.roles.items()))
    print(f"lr/‖W‖² of {last.weights.count} scale-invariant weights: {last.weights.eff_lr:.2e}; "
          f"var(branch)/var(skip) mean {sum(last.variance.values()) / len(last.variance):.3f}")


if __name__ == "__main__":
    main()
