"""One training run of a text task: sentence classification (SST-2) or translation (Multi30k).

The same harness as the image runs (``train.py``): the seed fixes the initial weights and the
order of the batches, the same for every arm; a run checkpoints every epoch and resumes; a
finished run is one line of the results file. What differs is the transformer convention:

- **AdamW** over the policy's parameter groups. Its weight decay is *decoupled*
  (``p -= lr * weight_decay * p`` at every step, apart from the adaptive gradient step), not the
  L2 penalty the paper's SGD runs add to the loss. A group the policy does not decay has weight
  decay 0 either way. The records say so (``settings["optimizer"] = "adamw"``).
- A linear warm-up, then a linear (BERT) or cosine decay of the learning rate.
- Label smoothing for translation (fairseq's 0.1).
- Metrics: accuracy on the SST-2 dev set (``test_acc``), or BLEU of greedy translations of the
  Multi30k test set, detokenized and scored with sacrebleu (``test_bleu``, with its signature).
  A record's ``metric`` names the key of its primary metric.
- Mechanisms every epoch, as for images: mean |γ| per role, and var(branch)/var(skip) at every
  residual addition, on a fixed batch of held-out sentences (SST-2 dev, Multi30k validation) cut to a
  common length (no padding).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import analysis, groups
from ..errors import GammaGuideError
from ..models import create_model
from ..policy import resolve_policy
from ..text_models import CLASSIFIERS, TRANSLATORS
from . import bleu, mechanisms, numerics
from .checkpoints import (discard_checkpoint, load_checkpoint, restore_training_state, save_checkpoint,
                          training_state)
from .distributed import DistContext
from .progress import bar as progress_bar
from .results import append_line, run_key
from .text_data import BOS, EOS, PAD, ClassificationData, Tokens, TranslationData, load_text, load_tokenizer, text_task
from .train import RunRecord, check_counts, check_non_negative, decay_time, environment, lr_factor

TEXT_SCHEDULES = ("linear", "cosine")
METRIC = {"classify": "test_acc", "translate": "test_bleu"}


@dataclass
class TextConfig:
    """Every setting of a text run; all of it is recorded with the result."""

    model: str = "textcls_preln"
    data: str = "sst2"
    policy: str = "guidelines"
    epochs: int = 3
    seed: int = 0
    batch_size: int = 64  # sentences (pairs) per step
    lr: float = 1e-3  # peak
    weight_decay: float = 0.01  # AdamW's decoupled decay, for what the policy decays
    beta2: float = 0.999
    schedule: str = "linear"
    warmup_epochs: float = 0.1
    label_smoothing: float = 0.0
    subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    width: int = 128
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    vocab_size: int = 8000
    max_len: int = 64  # tokens per sentence, special tokens included
    variance_batch: int = 256  # fixed test sentences for the variance ratios
    epoch_test_subset: int | None = None  # test sentences for the metric of every epoch but the last
    optimizer: str = "adamw"  # recorded so a reader knows the decay is decoupled; the only choice
    threads: int | None = None  # CPU threads of the run (numerics.py); None: cores // jobs, left out of the key

    @property
    def task(self) -> str:
        task = text_task(self.data)
        if task is None:
            raise GammaGuideError(f"{self.data!r} is not a text data spec; use sst2:PATH or multi30k:PATH")
        return task

    def check(self) -> None:
        resolve_policy(self.policy)
        task = self.task
        models = CLASSIFIERS if task == "classify" else TRANSLATORS
        if self.model not in models:
            raise GammaGuideError(f"--model {self.model!r} does not fit {self.data.partition(':')[0]} ({task}); "
                                  f"use {' or '.join(models)}")
        if self.schedule not in TEXT_SCHEDULES:
            raise GammaGuideError(f"unknown --schedule {self.schedule!r} for a text task; use "
                                  f"{' or '.join(TEXT_SCHEDULES)} (each after a linear warm-up)")
        if self.optimizer != "adamw":
            raise GammaGuideError(f"text tasks train with AdamW; got optimizer {self.optimizer!r}")
        check_counts(self, ("epochs", "batch_size", "width", "layers", "heads", "variance_batch"))
        numerics.check(self)
        if self.width % self.heads:
            raise GammaGuideError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        check_non_negative(self, ("lr", "weight_decay", "warmup_epochs"))
        for name in ("beta2", "label_smoothing", "dropout"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise GammaGuideError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")

    def settings(self) -> dict[str, Any]:
        return numerics.keyed_settings(asdict(self))

    def key(self) -> str:
        return run_key(self.settings())


@dataclass
class TextRunRecord(RunRecord):
    """A text run's line: the image record's fields plus the primary metric's name and BLEU."""

    metric: str = "test_acc"
    test_bleu: float | None = None
    bleu_signature: str | None = None
    train_tokens_per_s: float | None = None
    hypotheses: list[str] | None = None  # translation: the final test-set output, to rescore elsewhere


def text_lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a linear or cosine decay to 0."""
    if schedule == "cosine":
        return lr_factor(step, total, "cosine", warmup)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1 - (step - warmup) / max(1, total - warmup))


def load_data(cfg: TextConfig, data_dir: str | None = None) -> ClassificationData | TranslationData:
    return load_text(cfg.data, data_dir, vocab_size=cfg.vocab_size, max_len=cfg.max_len)


def build_model(cfg: TextConfig, data: ClassificationData | TranslationData) -> torch.nn.Module:
    options = dict(vocab_size=data.vocab_size, max_len=cfg.max_len, width=cfg.width, layers=cfg.layers,
                   heads=cfg.heads, dropout=cfg.dropout)
    if isinstance(data, ClassificationData):
        return create_model(cfg.model, num_classes=data.num_classes, **options)
    return create_model(cfg.model, **options)


def _probe_indices(tokens: Tokens, n: int, seed: int, cut: int = 12) -> tuple[torch.Tensor, int]:
    """Indices of ``n`` fixed test sentences at least ``cut`` tokens long (fewer if there are not
    enough; a shorter cut on very short data): the batch the variance ratios are measured on."""
    cut = min(cut, int(tokens.lengths.median()))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(tokens), generator=g)
    return order[tokens.lengths[order] >= cut][:n], cut


def length_batches(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int, pool: int = 50) -> list[torch.Tensor]:
    """The epoch's batches of sentence indices, drawn from ``seed`` and ``epoch`` alone (the same
    for every arm). A random order, cut into pools of ``pool`` batches; each pool is sorted by
    length before it is cut into batches, and the batches are shuffled: sentences of similar
    length share a batch, so little of it is padding (fairseq's bucketing, in small)."""
    g = torch.Generator().manual_seed(seed + epoch)
    steps = len(lengths) // batch_size
    order = torch.randperm(len(lengths), generator=g)[:steps * batch_size]
    batches: list[torch.Tensor] = []
    for i in range(0, len(order), batch_size * pool):
        part = order[i:i + batch_size * pool]
        batches += part[torch.argsort(lengths[part], stable=True)].split(batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


class TextTrainer:
    """The state of one text run; ``run()`` trains it to the end (resuming from a checkpoint)."""

    def __init__(self, config: TextConfig, data: ClassificationData | TranslationData, ctx: DistContext, *,
                 checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        config.check()
        if ctx.distributed:
            raise GammaGuideError("text tasks train in one process; run several runs at once with --jobs instead "
                                  "of torchrun")
        if data.task != config.task:
            raise GammaGuideError(f"the data ({data.name}) is for {data.task}, the config for {config.task}")
        self.cfg, self.ctx, self.device = config, ctx, ctx.device
        self.cuda = self.device.type == "cuda"
        self.numerics = numerics.resolve(config, self.device)
        self.numerics.apply(self.device)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.translate = config.task == "translate"
        data = data.subset(config.subset, config.test_subset, config.subset_seed)
        self.data = data
        self.tokenizer = load_tokenizer(data.tokenizer) if self.translate else None
        if self.translate:
            self.train_inputs = (data.train_src, data.train_tgt)
        else:
            self.train_inputs = (data.train,)
            self.train_y = data.train_y.to(self.device)
        n = len(self.train_inputs[0])
        if n < config.batch_size:
            raise GammaGuideError(f"the training set has {n} sentences, fewer than one batch of {config.batch_size}; "
                                  f"use a larger --subset or a smaller --batch-size")
        self.n_train = n
        self.dev_ids = [t.ids.to(self.device) for t in self.train_inputs]  # padded ids on the device

        torch.manual_seed(config.seed)  # the initial weights: the same for every arm of a seed
        self.model = build_model(config, data).to(self.device)
        self.probe = self._probe_batch()
        self.report = analysis.analyze(self.model, self.probe, config.policy, warn=False)
        self.groups = groups.param_groups(self.model, config.weight_decay, report=self.report, lr=config.lr)
        self.optimizer = torch.optim.AdamW(self.groups, lr=config.lr, betas=(0.9, config.beta2), eps=1e-8,
                                           weight_decay=config.weight_decay, foreach=True)
        self.steps_per_epoch = n // config.batch_size
        total = self.steps_per_epoch * config.epochs
        warmup = int(config.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: text_lr_factor(s, total, config.schedule, warmup))
        self.role_tensors = mechanisms.role_tensors(self.model, self.report, self.optimizer)
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.train_seconds = 0.0
        self.train_tokens = 0
        self.hypotheses: list[str] | None = None
        self.bleu_signature: str | None = None
        self._resume()

    def _probe_batch(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        seed = self.cfg.subset_seed
        if self.translate:
            d = self.data
            idx, cut = _probe_indices(d.valid_src, self.cfg.variance_batch, seed)
            tcut = min(cut, int(d.valid_tgt.lengths[idx].min()) - 1)
            return (d.valid_src.ids[idx, :cut].to(self.device), d.valid_tgt.ids[idx, :tcut].to(self.device))
        idx, cut = _probe_indices(self.data.test, self.cfg.variance_batch, seed)
        return self.data.test.ids[idx, :cut].to(self.device)

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint, self.device, ("key", self.cfg.key()), self.log)
        if state is None:
            return
        restore_training_state(state, self.model, self.optimizer, self.scheduler)
        self.history, self.start_epoch = state["history"], state["epoch"]
        self.train_seconds, self.train_tokens = state["train_seconds"], state["train_tokens"]
        self.hypotheses, self.bleu_signature = state.get("hypotheses"), state.get("bleu_signature")
        self.log(f"resuming {self.cfg.policy} seed {self.cfg.seed} after epoch {self.start_epoch}")

    def _save(self, epoch: int) -> None:
        if self.checkpoint is None:
            return
        save_checkpoint(self.checkpoint, {
            "key": self.cfg.key(), "epoch": epoch, **training_state(self.model, self.optimizer, self.scheduler),
            "history": self.history, "train_seconds": self.train_seconds, "train_tokens": self.train_tokens,
            "hypotheses": self.hypotheses, "bleu_signature": self.bleu_signature})

    def save_result(self, record: RunRecord, results: str | os.PathLike) -> None:
        append_line(results, record.to_json())
        self.discard_checkpoint()

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None:
            discard_checkpoint(self.checkpoint)

    # -- one epoch --------------------------------------------------------------------------------
    def batch(self, idx: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int, int]:
        """(model inputs, targets, real tokens, real targets) of the training sentences ``idx`` (a
        CPU tensor), each padded only to the longest sentence of the batch. The counts come from
        the lengths on the host, so that no step waits for the device."""
        dev_idx = idx.to(self.device, non_blocking=True)
        if self.translate:
            src, tgt = self.train_inputs
            ls, lt = int(src.lengths[idx].max()), int(tgt.lengths[idx].max())
            s = self.dev_ids[0][dev_idx, :ls]
            t = self.dev_ids[1][dev_idx, :lt]
            targets = int(tgt.lengths[idx].sum()) - len(idx)  # every target token but [BOS]
            return (s, t[:, :-1]), t[:, 1:], int(src.lengths[idx].sum()) + targets, targets
        (toks,) = self.train_inputs
        width = int(toks.lengths[idx].max())
        return (self.dev_ids[0][dev_idx, :width],), self.train_y[dev_idx], int(toks.lengths[idx].sum()), len(idx)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the real targets, correct predictions)."""
        if self.translate:
            out, target = out.flatten(0, 1), target.flatten()
            loss = F.cross_entropy(out.float(), target, ignore_index=PAD, label_smoothing=self.cfg.label_smoothing)
            return loss, ((out.argmax(1) == target) & (target != PAD)).sum()
        loss = F.cross_entropy(out.float(), target, label_smoothing=self.cfg.label_smoothing)
        return loss, (out.argmax(1) == target).sum()

    def train_epoch(self, epoch: int) -> tuple[float, float, float]:
        """(mean loss, accuracy, tokens/s); raises FloatingPointError on a non-finite loss.
        Accuracy is per sentence for classification, per target token for translation."""
        cfg = self.cfg
        lengths = self.train_inputs[0].lengths
        if self.translate:
            lengths = torch.maximum(lengths, self.train_inputs[1].lengths)
        batches = length_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        # Dropout draws from the global generator: seeded from (seed, epoch), so that every arm of
        # a seed drops the same units and a resumed run continues exactly as an unbroken one.
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1)
        self.model.train()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss * n, correct
        n = tokens = 0
        bar = progress_bar(self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step",
                           self.progress and sys.stderr.isatty())
        check_every, shown = 20, 0
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            inputs, target, real, counted = self.batch(batches[step])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                out = self.model(*inputs)
            loss, correct = self.loss(out, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                sums += torch.stack([loss.detach().double() * counted, correct.double()])
            n += counted
            tokens += real
            if (step + 1) % check_every == 0 or step + 1 == self.steps_per_epoch:
                loss_sum, right = sums.tolist()  # one host sync every few steps
                if not math.isfinite(loss_sum):
                    bar.close()
                    raise FloatingPointError(f"non-finite training loss ({loss_sum}) at epoch {epoch + 1}, "
                                             f"step {step + 1}")
                bar.update(step + 1 - shown)
                shown = step + 1
                bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{right / n:.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        loss_sum, right = sums.tolist()
        self.train_seconds += seconds
        self.train_tokens += tokens
        return loss_sum / n, right / n, tokens / seconds

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, last: bool = True) -> tuple[float, int]:
        d = self.data
        toks, ys = d.test, d.test_y
        if not last and self.cfg.epoch_test_subset and self.cfg.epoch_test_subset < len(ys):
            part = d.subset(None, self.cfg.epoch_test_subset, self.cfg.subset_seed)
            toks, ys = part.test, part.test_y
        self.model.eval()
        correct = 0
        for i in range(0, len(ys), 512):
            sl = torch.arange(i, min(i + 512, len(ys)))
            part = toks.take(sl)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                pred = self.model(part.ids.to(self.device)).argmax(1)
            correct += int((pred.cpu() == ys[sl]).sum())
        return correct / len(ys), len(ys)

    @torch.no_grad()
    def valid_loss(self) -> float:
        """Teacher-forced cross-entropy (no label smoothing) per target token of the validation set."""
        d = self.data
        self.model.eval()
        total = count = 0.0
        for i in range(0, len(d.valid_src), 256):
            sl = torch.arange(i, min(i + 256, len(d.valid_src)))
            src, tgt = d.valid_src.take(sl).ids.to(self.device), d.valid_tgt.take(sl).ids.to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                out = self.model(src, tgt[:, :-1])
            target = tgt[:, 1:]
            total += float(F.cross_entropy(out.float().flatten(0, 1), target.flatten(), ignore_index=PAD,
                                           reduction="sum"))
            count += int((target != PAD).sum())
        return total / count

    @torch.no_grad()
    def translate_test(self, last: bool = True) -> tuple[float | None, int, list[str]]:
        """(BLEU or None without sacrebleu, sentences, hypotheses) of greedy translations."""
        from .text_data import decode

        d = self.data
        src, refs = d.test_src, d.test_refs
        if not last and self.cfg.epoch_test_subset and self.cfg.epoch_test_subset < len(refs):
            part = d.subset(None, self.cfg.epoch_test_subset, self.cfg.subset_seed)
            src, refs = part.test_src, part.test_refs
        order = torch.argsort(src.lengths, descending=True)  # similar lengths batch together
        hyps: list[str] = [""] * len(refs)
        for i in range(0, len(order), 250):
            idx = order[i:i + 250]
            part = src.take(idx)
            ids = greedy(self.model, part.ids.to(self.device), self.cfg.max_len, self.cuda)
            for j, text in zip(idx.tolist(), decode(self.tokenizer, ids.cpu()), strict=True):
                hyps[j] = text
        if not bleu.available():
            return None, len(refs), hyps
        score = bleu.corpus_bleu(hyps, refs)
        self.bleu_signature = score.signature
        return score.score, len(refs), hyps

    def measure(self, epoch: int, train_loss: float, train_acc: float, tok_s: float) -> dict[str, Any]:
        first = epoch * self.steps_per_epoch
        factors = [self.scheduler.lr_lambdas[0](s) for s in range(first, first + self.steps_per_epoch)]
        lr = self.cfg.lr * sum(factors) / len(factors)  # the epoch's mean learning rate
        last = epoch + 1 == self.cfg.epochs
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                               "train_tokens_per_s": tok_s,
                               "decay_time": decay_time(self.scheduler.lr_lambdas[0], self.cfg.lr,
                                                        self.cfg.weight_decay, first + self.steps_per_epoch)}
        if self.translate:
            row["valid_loss"] = self.valid_loss()
            score, sentences, hyps = self.translate_test(last)
            row.update(test_bleu=score, test_sentences=sentences)
            if last:
                self.hypotheses = hyps
        else:
            row["test_acc"], row["test_sentences"] = self.accuracy(last)
        row.update(mechanisms.gamma_stats(self.role_tensors, lr))
        row["variance_ratio"] = mechanisms.variance_ratios(self.model, self.probe)
        return row

    # -- the whole run ------------------------------------------------------------------------------
    def run(self) -> TextRunRecord:
        cfg = self.cfg
        wall = time.perf_counter()
        status, reason = "ok", None
        metric = METRIC[cfg.task]
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                loss, acc, tok_s = self.train_epoch(epoch)
                row = self.measure(epoch, loss, acc, tok_s)
                self.history.append(row)
                value = row.get(metric)
                shown = "-" if value is None else f"{value:.4f}" if metric == "test_acc" else f"{value:.2f}"
                self.log(f"[{cfg.policy} seed {cfg.seed}] epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  "
                         f"train {acc:.4f}  {metric} {shown}  {tok_s:.0f} tok/s")
                self._save(epoch + 1)
        except FloatingPointError as exc:
            status, reason = "failed", str(exc)
            self.log(f"[{cfg.policy} seed {cfg.seed}] stopped: {exc}")
        if self.translate and self.bleu_signature:
            self.log(f"[{cfg.policy} seed {cfg.seed}] sacrebleu signature: {self.bleu_signature}")
        counts = self.report.counts()
        decayed = {r: 0 for r in counts}
        for e in self.report.entries:
            decayed[e.role] += e.decay
        final = self.history[-1].get(metric) if status == "ok" and self.history else None
        return TextRunRecord(
            key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status=status, reason=reason,
            test_acc=final if metric == "test_acc" else None,
            model=cfg.model, data=cfg.data, epochs=cfg.epochs, settings=cfg.settings(), history=self.history,
            roles={r: {"count": counts[r], "decayed": decayed[r]} for r in counts if counts[r]},
            wall_s=time.perf_counter() - wall, environment=environment(self.device, 1, self.numerics),
            metric=metric, test_bleu=final if metric == "test_bleu" else None,
            bleu_signature=self.bleu_signature if self.translate else None,
            train_tokens_per_s=self.train_tokens / self.train_seconds if self.train_seconds else None,
            hypotheses=self.hypotheses if self.translate and status == "ok" else None,
        )


@torch.no_grad()
def greedy(model: torch.nn.Module, src: torch.Tensor, max_len: int, cuda: bool = False) -> torch.Tensor:
    """Greedy decoding: target ids (without [BOS]) for a batch of source ids; [EOS] ends a
    sentence. Each step runs the decoder over the whole prefix (no cache; sentences are short)."""
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        memory, mask = model.encode(src)
    steps = min(max_len - 1, 2 * src.shape[1] + 10)
    ys = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    done = torch.zeros(len(src), dtype=torch.bool, device=src.device)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            nxt = model.decode(ys, memory, mask)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        ys = torch.cat([ys, nxt[:, None]], 1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return ys[:, 1:]


# ----------------------------------------------------------------------------- the grid's hooks


def default_arms(model: str, data: ClassificationData | TranslationData | None = None,
                 cfg: TextConfig | None = None, log: Callable[[str], None] | None = None) -> tuple[str, ...]:
    """no_gamma, guidelines, all, and only:<role> for every role the model's γ have, except an
    only:<role> that decides every parameter as an earlier arm does for this model (in a pre-LN
    model only:residual_last is guidelines): a grid need not train one policy twice."""
    cfg = cfg or TextConfig(model=model, data="multi30k" if model in TRANSLATORS else "sst2")
    vocab = data.vocab_size if data is not None else cfg.vocab_size
    options = dict(vocab_size=vocab, max_len=cfg.max_len, width=cfg.width, layers=cfg.layers, heads=cfg.heads)
    net = create_model(model, **options) if model in TRANSLATORS else create_model(model, num_classes=2, **options)
    example = net.example_inputs(2, min(8, cfg.max_len))
    counts = analysis.analyze(net, example, warn=False).counts()
    roles = [r for r in ("residual_last", "scale_invariant", "shortcut", "stream", "head") if counts.get(r)]
    arms: list[str] = []
    seen: dict[frozenset, str] = {}
    for arm in ("no_gamma", "guidelines", "all", *(f"only:{r}" for r in roles)):
        decided = analysis.analyze(net, example, arm, warn=False).decisions()
        key = frozenset(name for name, decay in decided.items() if decay)
        if arm.startswith("only:") and key in seen:
            if log is not None:
                log(f"{arm} left out: for {model} it is the same policy as {seen[key]}")
            continue
        seen.setdefault(key, arm)
        arms.append(arm)
    return tuple(arms)


def prepare(cfg: TextConfig, data_dir: str | None = None, progress: bool = True) -> None:
    """Train the tokenizer and encode the data once, before any worker reads the cache."""
    load_data(cfg, data_dir)


def failed_record(cfg: TextConfig, reason: str) -> TextRunRecord:
    return TextRunRecord(key=cfg.key(), arm=cfg.policy, seed=cfg.seed, status="failed", reason=reason,
                         test_acc=None, model=cfg.model, data=cfg.data, epochs=cfg.epochs,
                         settings=cfg.settings(), metric=METRIC[cfg.task])


# ----------------------------------------------------------------------------- sizing to a budget


def auto_epochs(base: TextConfig, runs: int, jobs: int, budget_s: float, *, data_dir: str | None = None,
                device: str = "auto", probe_s: float = 20.0, log: Callable[[str], None] = print) -> int:
    """Epochs that let ``runs`` runs, ``jobs`` at a time, finish within ``budget_s`` seconds.

    ``jobs`` processes train at once for ``probe_s`` seconds (at most a tenth of the budget; what
    the grid will do) and then time
    one evaluation each (the per-epoch metric and the mechanisms); 15% is left for start-up and the
    final evaluation on the whole test set."""
    import multiprocessing as mp

    from .ablate import _collect

    probe_s = min(probe_s, budget_s / 10)  # a short budget is not spent on measuring
    data = load_data(base, data_dir).subset(base.subset, base.test_subset, base.subset_seed)
    n_train = len(data.train_src if isinstance(data, TranslationData) else data.train)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start_line = ctx.Barrier(jobs)
    procs = [ctx.Process(target=_probe_throughput, args=(base, data_dir, device, jobs, probe_s, start_line,
                                                         results)) for _ in range(jobs)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    probes = _collect(results, procs)
    steps_s = sum(s for s, _ in probes) / len(probes)
    eval_s = max(e for _, e in probes)
    per_epoch = (n_train // base.batch_size) / steps_s + eval_s  # one run while `jobs` share the device
    waves = math.ceil(runs / jobs)
    left = budget_s - (time.perf_counter() - start)
    epochs = max(1, int(0.85 * left / waves / per_epoch))
    log(f"probe: {jobs} processes train {steps_s:.1f} steps/s each and evaluate in {eval_s:.1f} s; one epoch "
        f"{per_epoch:.1f} s; {runs} runs in {waves} wave(s) -> {epochs} epochs fit in {left:.0f} s")
    return epochs


def _probe_throughput(base: TextConfig, data_dir, device, jobs, seconds, start_line, results) -> None:
    from .distributed import pick_device

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    data = load_data(base, data_dir)
    trainer = TextTrainer(replace(base, epochs=1000), data, DistContext(0, 1, 0, pick_device(device)),
                          progress=False)
    trainer.steps_per_epoch = chunk = min(20, trainer.steps_per_epoch)  # short slices, to end on time
    trainer.train_epoch(0)  # warm-up: kernels, allocator
    start_line.wait()  # measure only while all jobs train at once
    steps, epoch, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.train_epoch(epoch)
        steps += chunk
        epoch += 1
    rate = steps / (time.perf_counter() - start)
    start = time.perf_counter()
    trainer.measure(1, 0.0, 0.0, 0.0)  # the per-epoch metric and mechanisms
    results.put((rate, time.perf_counter() - start))
