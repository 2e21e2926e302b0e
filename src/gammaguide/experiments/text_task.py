"""The text tasks: sentence classification (SST-2) and translation (Multi30k), with a transformer
and AdamW.

What differs from the image task:

- **AdamW** over the policy's parameter groups. Its weight decay is *decoupled*
  (``p -= lr * weight_decay * p`` at every step, apart from the adaptive gradient step), not the
  L2 penalty the paper's SGD runs add to the loss. A group the policy does not decay has weight
  decay 0 either way. The records say so (``settings["optimizer"] = "adamw"``).
- A linear warm-up, then a linear (BERT) or cosine decay of the learning rate.
- Batches of sentences of similar length (``length_batches``), padded only to their longest;
  dropout is seeded from (seed, epoch), so every arm of a seed drops the same units.
- Label smoothing for translation (fairseq's 0.1).
- Metrics: accuracy on the SST-2 dev set (``test_acc``), or BLEU of greedy translations of the
  Multi30k test set, detokenized and scored with sacrebleu (``test_bleu``, with its signature).
  A record's ``metric`` names the key of its primary metric.
- The variance ratios are measured on a fixed batch of held-out sentences (SST-2 dev, Multi30k
  validation) cut to a common length (no padding).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .. import analysis
from ..errors import GammaGuideError
from ..models import create_model
from ..text_models import CLASSIFIERS, TRANSLATORS
from . import bleu
from .config import TextConfig, text_lr_factor
from .distributed import DistContext
from .numerics import Numerics
from .results import TextRunRecord
from .task import Batch, Option, Task
from .text_data import (BOS, EOS, PAD, ClassificationData, Tokens, TranslationData, decode, load_text, load_tokenizer,
                        text_task)

METRIC = {"classify": "test_acc", "translate": "test_bleu"}


class TextTask(Task):
    """What sentence classification and translation share."""

    about = "text models (--data sst2:PATH or multi30k:PATH)"
    a_model = "a text model"
    config = TextConfig
    record = TextRunRecord
    unit = "tokens"
    noun = "sentences"
    metrics_first = False
    optimizer_name = "AdamW (decoupled)"
    kind: str  # text_data.TASKS' name: "classify" or "translate"
    models: tuple[str, ...]
    options = (
        Option("--width", "width", int, "text models: width of the transformer"),
        Option("--layers", "layers", int, "text models: transformer blocks (encoder and decoder each, for "
               "translation)"),
        Option("--heads", "heads", int, "text models: attention heads"),
        Option("--dropout", "dropout", float, "text models: dropout"),
        Option("--label-smoothing", "label_smoothing", float, "text tasks: label smoothing of the loss"),
        Option("--vocab-size", "vocab_size", int, "text tasks: subword vocabulary learned on the training split"),
        Option("--max-len", "max_len", int, "text tasks: tokens per sentence (longer ones are cut; translation: "
               "left out)"),
        Option("--beta2", "beta2", float, "text tasks: AdamW's beta2"),
        Option("--epoch-test-subset", "epoch_test_subset", int,
               "test sentences scored every epoch but the last (default: all of them)"),
    )

    @classmethod
    def claims(cls, spec: str) -> bool:
        return text_task(spec) == cls.kind

    @classmethod
    def adjust(cls, cfg: TextConfig, args: Any) -> TextConfig:
        if getattr(args, "model", None) is None and cfg.model not in cls.models:  # the protocol's, or the first
            cfg = replace(cfg, model=cls.models[0])
        return cfg

    @classmethod
    def load(cls, cfg: TextConfig, data_dir: str | None = None, progress: bool = True):
        return load_data(cfg, data_dir)

    @classmethod
    def default_arms(cls, cfg: TextConfig, log: Callable[[str], None] | None = None) -> tuple[str, ...]:
        return default_arms(cfg.model, cfg=cfg, log=log)

    # -- one run ---------------------------------------------------------------------------------------
    def __init__(self, configs: list[TextConfig], data: ClassificationData | TranslationData, ctx: DistContext,
                 numerics: Numerics, fused: bool):
        cfg = self.cfg = configs[0]
        if ctx.distributed:
            raise GammaGuideError("text tasks train in one process; run several runs at once with --jobs instead "
                                  "of torchrun")
        if data.task != cfg.task:
            raise GammaGuideError(f"the data ({data.name}) is for {data.task}, the config for {cfg.task}")
        self.device, self.numerics = ctx.device, numerics
        self.lr_factor = text_lr_factor
        data = self.data = data.subset(cfg.subset, cfg.test_subset, cfg.subset_seed)
        self.train_inputs = self._train_inputs()
        self.n_train = len(self.train_inputs[0])
        self.dev_ids = [t.ids.to(self.device) for t in self.train_inputs]  # padded ids on the device
        self.example = self.probe_batch = self._probe_batch()
        self.hypotheses: list[str] | None = None
        self.bleu_signature: str | None = None

    def new_model(self, cfg: TextConfig) -> torch.nn.Module:
        return build_model(cfg, self.data)

    def optimizer(self, params: Any, cfg: TextConfig, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=weight_decay,
                                 foreach=True)

    def batches(self, epoch: int) -> Iterator[Batch]:
        cfg = self.cfg
        lengths = self.train_inputs[0].lengths
        if len(self.train_inputs) > 1:
            lengths = torch.maximum(lengths, self.train_inputs[1].lengths)
        batches = length_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        # Dropout draws from the global generator: seeded from (seed, epoch), so that every arm of
        # a seed drops the same units and a resumed run continues exactly as an unbroken one.
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1)
        for idx in batches:
            yield self.batch(idx)

    def probe(self) -> Any:
        return self.probe_batch

    def state(self) -> dict[str, Any]:
        return {"hypotheses": self.hypotheses, "bleu_signature": self.bleu_signature}

    def restore(self, state: dict[str, Any]) -> None:
        self.hypotheses, self.bleu_signature = state.get("hypotheses"), state.get("bleu_signature")

    def record_fields(self, ok: bool, final: float | None) -> dict[str, Any]:
        return {"test_acc": final, "metric": self.metric}


class SentenceClassification(TextTask):
    label = "sst2"
    kind = "classify"
    models = CLASSIFIERS
    protocols = ("sst2-smoke", "sst2-cpu")

    def _train_inputs(self) -> tuple[Tokens, ...]:
        self.train_y = self.data.train_y.to(self.device)
        return (self.data.train,)

    def _probe_batch(self) -> torch.Tensor:
        idx, cut = _probe_indices(self.data.test, self.cfg.variance_batch, self.cfg.subset_seed)
        return self.data.test.ids[idx, :cut].to(self.device)

    def batch(self, idx: torch.Tensor) -> Batch:
        """(model inputs, labels, sentences, real tokens) of the training sentences ``idx`` (a CPU
        tensor), padded only to the longest sentence of the batch. The counts come from the
        lengths on the host, so that no step waits for the device."""
        dev_idx = idx.to(self.device, non_blocking=True)
        (toks,) = self.train_inputs
        width = int(toks.lengths[idx].max())
        return (self.dev_ids[0][dev_idx, :width],), self.train_y[dev_idx], len(idx), int(toks.lengths[idx].sum())

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), target, label_smoothing=self.cfg.label_smoothing)

    def correct(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out.argmax(1) == target).sum()

    @torch.no_grad()
    def evaluate(self, network: Any, last: bool) -> list[dict[str, Any]]:
        d, model = self.data, network.model
        toks, ys = d.test, d.test_y
        if not last and self.cfg.epoch_test_subset and self.cfg.epoch_test_subset < len(ys):
            part = d.subset(None, self.cfg.epoch_test_subset, self.cfg.subset_seed)
            toks, ys = part.test, part.test_y
        model.eval()
        correct = 0
        for i in range(0, len(ys), 512):
            sl = torch.arange(i, min(i + 512, len(ys)))
            part = toks.take(sl)
            with self.numerics.autocast(self.device):
                pred = model(part.ids.to(self.device)).argmax(1)
            correct += int((pred.cpu() == ys[sl]).sum())
        return [{"test_acc": correct / len(ys), "test_sentences": len(ys)}]


class Translation(TextTask):
    label = "multi30k"
    kind = "translate"
    metric = "test_bleu"
    models = TRANSLATORS
    protocols = ("multi30k-smoke", "multi30k-gpu")

    @classmethod
    def default_config(cls, spec: str) -> TextConfig:
        """fairseq's transformer_iwslt_de_en recipe, scaled."""
        return TextConfig(model="seq2seq_postln", data=spec, schedule="cosine", label_smoothing=0.1, lr=5e-4,
                          beta2=0.98, dropout=0.3, width=256, layers=3, max_len=128, batch_size=128,
                          weight_decay=1e-4, epochs=20, warmup_epochs=1.0)

    def _train_inputs(self) -> tuple[Tokens, ...]:
        self.tokenizer = load_tokenizer(self.data.tokenizer)
        return (self.data.train_src, self.data.train_tgt)

    def _probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data
        idx, cut = _probe_indices(d.valid_src, self.cfg.variance_batch, self.cfg.subset_seed)
        tcut = min(cut, int(d.valid_tgt.lengths[idx].min()) - 1)
        return (d.valid_src.ids[idx, :cut].to(self.device), d.valid_tgt.ids[idx, :tcut].to(self.device))

    def batch(self, idx: torch.Tensor) -> Batch:
        """(model inputs, targets, real targets, real tokens) of the training pairs ``idx``."""
        dev_idx = idx.to(self.device, non_blocking=True)
        src, tgt = self.train_inputs
        ls, lt = int(src.lengths[idx].max()), int(tgt.lengths[idx].max())
        s = self.dev_ids[0][dev_idx, :ls]
        t = self.dev_ids[1][dev_idx, :lt]
        targets = int(tgt.lengths[idx].sum()) - len(idx)  # every target token but [BOS]
        return (s, t[:, :-1]), t[:, 1:], targets, int(src.lengths[idx].sum()) + targets

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float().flatten(0, 1), target.flatten(), ignore_index=PAD,
                               label_smoothing=self.cfg.label_smoothing)

    def correct(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, target = out.flatten(0, 1), target.flatten()
        return ((out.argmax(1) == target) & (target != PAD)).sum()

    @torch.no_grad()
    def evaluate(self, network: Any, last: bool) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"valid_loss": self.valid_loss(network.model)}
        score, sentences, hyps = self.translate_test(network.model, last)
        row.update(test_bleu=score, test_sentences=sentences)
        if last:
            self.hypotheses = hyps
        return [row]

    @torch.no_grad()
    def valid_loss(self, model: torch.nn.Module) -> float:
        """Teacher-forced cross-entropy (no label smoothing) per target token of the validation set."""
        d = self.data
        model.eval()
        total = count = 0.0
        for i in range(0, len(d.valid_src), 256):
            sl = torch.arange(i, min(i + 256, len(d.valid_src)))
            src, tgt = d.valid_src.take(sl).ids.to(self.device), d.valid_tgt.take(sl).ids.to(self.device)
            with self.numerics.autocast(self.device):
                out = model(src, tgt[:, :-1])
            target = tgt[:, 1:]
            total += float(F.cross_entropy(out.float().flatten(0, 1), target.flatten(), ignore_index=PAD,
                                           reduction="sum"))
            count += int((target != PAD).sum())
        return total / count

    @torch.no_grad()
    def translate_test(self, model: torch.nn.Module, last: bool = True) -> tuple[float | None, int, list[str]]:
        """(BLEU or None without sacrebleu, sentences, hypotheses) of greedy translations."""
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
            ids = greedy(model, part.ids.to(self.device), self.cfg.max_len, self.device.type == "cuda")
            for j, text in zip(idx.tolist(), decode(self.tokenizer, ids.cpu()), strict=True):
                hyps[j] = text
        if not bleu.available():
            return None, len(refs), hyps
        score = bleu.corpus_bleu(hyps, refs)
        self.bleu_signature = score.signature
        return score.score, len(refs), hyps

    def notes(self) -> list[str]:
        return [f"sacrebleu signature: {self.bleu_signature}"] if self.bleu_signature else []

    def record_fields(self, ok: bool, final: float | None) -> dict[str, Any]:
        return {"test_acc": None, "metric": self.metric, "test_bleu": final, "bleu_signature": self.bleu_signature,
                "hypotheses": self.hypotheses if ok else None}


# ----------------------------------------------------------------------------- helpers


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
