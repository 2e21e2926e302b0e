"""Image classification (CIFAR-10/100, any ImageFolder tree) with a built-in ResNet and SGD.

Pairing: ``seed`` fixes the initial weights (the trainer builds the model right after
``torch.manual_seed(seed)``) and, through ``data.epoch_plan``, the order of the batches and every
crop and flip. Two runs that differ only in their policy start from the same weights and see the
same images in the same order. A fused group draws each seed's batches once and gives them to
every run of that seed; under torchrun each rank takes its share of the single-process batches.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GammaGuideError
from ..models import MODELS, create_model
from . import fused as FU
from .config import TrainConfig, lr_factor
from .data import Augment, Dataset, balanced_indices, epoch_plan, load_dataset
from .distributed import DistContext
from .numerics import Numerics
from .task import Batch, Option, Task




class ImageClassification(Task):
    label = "image"
    about = "image models (--data cifar10, cifar100 or imagefolder:PATH)"
    a_model = "an image model"
    config = TrainConfig
    fusable = True
    distributed = True
    protocols = ("smoke", "cpu", "gpu", "cifar100-d1", "cifar10-d1")
    options = (
        Option("--depth", "depth", int, "CIFAR ResNet depth 6n+2 (20, 56, 110): sets --model resnetN",
               "--depth sets a CIFAR ResNet; for a text model use --layers"),
        Option("--momentum", "momentum", float, "SGD momentum (default 0.9)",
               "--momentum and --nesterov set SGD (image models); text models train with AdamW, whose momentum is "
               "its beta1 = 0.9 (--beta2 sets the other)"),
        Option("--nesterov", "nesterov", None, "Nesterov momentum", "--momentum and --nesterov set SGD (image "
               "models); text models train with AdamW, whose momentum is its beta1 = 0.9 (--beta2 sets the other)",
               store_true=True),
        Option("--sync-bn", "sync_bn", None, "SyncBatchNorm under torchrun",
               "--sync-bn is for image models under torchrun; text models have no BatchNorm", store_true=True),
        Option("--precision", "precision", str, "float32, or bf16 autocast (default: bf16 on CUDA, float32 on the "
               "CPU); recorded in the key", "--precision and --memory-format set image runs; text runs train in "
               "float32 on the CPU (bf16 autocast on CUDA): leave them out", choices=("float32", "bf16")),
        Option("--memory-format", "memory_format", str, "memory format of activations (default: channels_last on "
               "CUDA, contiguous on the CPU); recorded in the key", "--precision and --memory-format set image "
               "runs; text runs train in float32 on the CPU (bf16 autocast on CUDA): leave them out",
               choices=("contiguous", "channels_last")),
    )

    @classmethod
    def claims(cls, spec: str) -> bool:
        return True  # the default task: an unknown SPEC gets the image loader's message

    @classmethod
    def default_config(cls, spec: str) -> TrainConfig:
        return TrainConfig(data=spec)

    @classmethod
    def adjust(cls, cfg: TrainConfig, args: Any) -> TrainConfig:
        depth = getattr(args, "depth", None)
        if depth is not None:
            cfg = replace(cfg, model=f"resnet{depth}")
        if cfg.model not in MODELS:
            raise GammaGuideError(f"unknown --model {cfg.model!r}" + (" (--depth must be 6n+2: 20, 32, 44, 56, 110)"
                                  if depth is not None else "") + f"; built-in models: {', '.join(sorted(MODELS))}")
        return cfg

    @classmethod
    def load(cls, cfg: TrainConfig, data_dir: str | None = None, progress: bool = True) -> Dataset:
        return load_dataset(cfg.data, data_dir, progress=progress)

    # -- one run or one fused group -------------------------------------------------------------------
    def __init__(self, configs: list[TrainConfig], data: Dataset, ctx: DistContext, numerics: Numerics,
                 fused: bool):
        cfg = self.cfg = configs[0]
        self.ctx, self.device, self.numerics, self.fused = ctx, ctx.device, numerics, fused
        self.cuda = self.device.type == "cuda"
        if cfg.sync_bn and ctx.distributed and not self.cuda:
            raise GammaGuideError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs only on GPUs under "
                                  "DistributedDataParallel; leave it out on the CPU (each process then normalizes "
                                  "with the statistics of its own share of the batch)")
        if cfg.batch_size % ctx.world_size:
            raise GammaGuideError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world_size} "
                                  f"processes; use a multiple of {ctx.world_size}")
        data = data.subset(cfg.subset, cfg.test_subset, cfg.subset_seed)
        self.data, self.num_classes, self.n_train = data, data.num_classes, len(data.train_y)
        self.train_x, self.train_y = data.train_x.to(self.device), data.train_y.to(self.device)
        self.test_x, self.test_y = data.test_x.to(self.device), data.test_y.to(self.device)
        self.epoch_test = None
        if cfg.epoch_test_subset and cfg.epoch_test_subset < len(data.test_y):
            part = data.subset(None, cfg.epoch_test_subset, cfg.subset_seed)
            self.epoch_test = (part.test_x.to(self.device), part.test_y.to(self.device))
        # A fused group turns its batch channels_last after fusing it (network.Fused).
        self.augment = Augment(self.device, channels_last=numerics.channels_last and not fused)
        probe = _probe_indices(data.test_y, cfg.variance_batch, cfg.subset_seed).to(self.device)
        self.variance_x, self.variance_y = self.test_x[probe], self.test_y[probe]
        self.example = self.augment.normalize(self.test_x[:2])
        self.lr_factor = lr_factor
        self.seeds = sorted({c.seed for c in configs})
        self.seed_of_run = torch.tensor([self.seeds.index(c.seed) for c in configs], device=self.device)
        if fused:
            FU.check_model_fuses(cfg.model, self.num_classes)
            self.example = self.example.cpu()

    def new_model(self, cfg: TrainConfig) -> nn.Module:
        model = create_model(cfg.model, num_classes=self.num_classes)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_bn and not self.fused else model

    def place(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.numerics.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        return model

    def optimizer(self, params: Any, cfg: TrainConfig, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=weight_decay, foreach=True)

    # -- an epoch -------------------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterator[Batch]:
        if self.fused:
            for x, y in self.group_batches(epoch):
                yield x, y, y.shape[1], y.shape[1]
            return
        cfg = self.cfg
        plan = epoch_plan(self.n_train, cfg.seed, epoch)
        order = self._local_order(epoch, plan.order).to(self.device)
        dy, dx, flip = plan.dy.to(self.device), plan.dx.to(self.device), plan.flip.to(self.device)
        local = cfg.batch_size // self.ctx.world_size
        for step in range(self.n_train // cfg.batch_size):
            idx = order[step * local:(step + 1) * local]
            yield self.augment(self.train_x[idx], dy[idx], dx[idx], flip[idx]), self.train_y[idx], local, local

    def _local_order(self, epoch: int, plan_order: torch.Tensor) -> torch.Tensor:
        """This process's share of the epoch: a DistributedSampler over the training images.

        Its permutation is the single-process one, and rank r takes every world-th image, so
        step s of all ranks together covers exactly the single-process batch s."""
        if not self.ctx.distributed:
            return plan_order
        sampler = torch.utils.data.DistributedSampler(range(self.n_train), num_replicas=self.ctx.world_size,
                                                      rank=self.ctx.rank, shuffle=True, seed=self.cfg.seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler))

    def group_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fused group's batches: ``(x [N, B, C, H, W], y [N, B])`` per step, run m's batch at m.

        Each seed's batch is augmented once (``data.epoch_plan`` of that seed, as a lone run
        draws it) and shared by the runs of that seed."""
        b = self.cfg.batch_size
        plans = [epoch_plan(self.n_train, s, epoch) for s in self.seeds]
        order = torch.stack([p.order for p in plans]).to(self.device)
        dys = torch.stack([p.dy for p in plans]).to(self.device)
        dxs = torch.stack([p.dx for p in plans]).to(self.device)
        flips = torch.stack([p.flip for p in plans]).to(self.device)
        seed_rows = torch.arange(len(self.seeds), device=self.device).view(-1, 1)
        for step in range(self.n_train // b):
            idx = order[:, step * b:(step + 1) * b]  # [S, B]: each seed's batch
            rows = seed_rows.expand_as(idx)
            x = self.augment(self.train_x[idx.reshape(-1)], dys[rows, idx].reshape(-1), dxs[rows, idx].reshape(-1),
                             flips[rows, idx].reshape(-1))
            x = x.view(len(self.seeds), b, *x.shape[1:])[self.seed_of_run]
            yield x, self.train_y[idx][self.seed_of_run]

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fused:  # logits [B, N, K], targets [N, B]: each run's mean cross-entropy
            return FU.run_losses(out, target)
        return F.cross_entropy(out, target)

    def correct(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return (out.argmax(-1) == target.t()).sum(0)
        return (out.argmax(1) == target).sum()

    # -- measurements ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, network: Any, last: bool) -> list[dict[str, Any]]:
        """Each run's accuracy on the whole test set, or on the per-epoch part of it."""
        xs, ys = (self.test_x, self.test_y) if last or self.epoch_test is None else self.epoch_test
        network.model.eval()
        n = network.n
        correct = torch.zeros(n, device=self.device, dtype=torch.long)
        chunk = 1000 if n <= 8 else max(100, 8000 // n)  # eval-mode BN: chunking changes nothing
        for i in range(0, len(ys), chunk):
            x = self.augment.normalize(xs[i:i + chunk])
            with self.numerics.autocast(self.device):
                correct += (network.logits(x).argmax(-1) == ys[i:i + chunk, None]).sum(0)
        return [{"test_acc": int(c) / len(ys), "test_images": len(ys)} for c in correct.tolist()]

    def probe(self) -> torch.Tensor:
        return self.augment.normalize(self.variance_x)


def _probe_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The test images whose residual variances every epoch measures: the same for every arm and
    epoch, and class-balanced (a test set stored by class would otherwise give one class)."""
    n = min(n, len(labels))
    try:
        return balanced_indices(labels, n, seed, "test")
    except GammaGuideError:  # fewer images than classes, or a class too small: take them in order
        return torch.arange(n)


