"""Text data as padded token-id tensors, with a subword tokenizer trained once and cached.

Two SPECs:

- ``sst2:PATH``: GLUE SST-2, ``PATH/train.tsv`` and ``PATH/dev.tsv`` (a ``sentence<TAB>label``
  header, then one sentence and its 0/1 label per line). The dev set is the test set here, as
  in every SST-2 paper (GLUE's test labels are not public).
- ``multi30k:PATH``: Multi30k German-English, ``PATH/raw/{train,val,test_2016_flickr}.{de,en}``
  (or those files in PATH itself; ``test.{de,en}`` also works), one sentence per line, line i of
  the ``.de`` file aligned with line i of the ``.en`` file. German is the source.

PATH may be left out or relative: it is then looked up under ``--data-dir`` and
``$GAMMAGUIDE_DATA`` (``sst2`` alone finds ``$GAMMAGUIDE_DATA/sst2``, ``multi30k`` finds
``$GAMMAGUIDE_DATA/multi30k-de-en``).

The tokenizer is a byte-pair encoding learned on the training split alone (Hugging Face
``tokenizers``; Metaspace pre-tokenization, so that decoding gives back the spaced text that
BLEU is scored on). Training it and encoding every sentence happen once: the result goes to a
cache file keyed by the files' path, names, sizes and modification times and by the tokenizer
settings (``$GAMMAGUIDE_CACHE``, as for images). A malformed line (a TSV line without exactly
one TAB, a label other than 0 or 1, an empty sentence, bytes that are not UTF-8) is skipped,
with one warning per file that names the file, the line and what was wrong.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import GammaGuideError
from .data import CACHE_ENV, DATA_ENV, balanced_indices, cache_dir

TEXT_CACHE_VERSION = 1
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[BOS]", "[EOS]")  # ids 0-4; 0 is the models' padding id
PAD, UNK, CLS, BOS, EOS = range(len(SPECIALS))
TASKS = {"sst2": "classify", "multi30k": "translate"}
_DEFAULT_FOLDERS = {"sst2": ("sst2", "SST-2"), "multi30k": ("multi30k-de-en", "multi30k")}
_MAX_NAMED = 5  # malformed lines named in a warning; the rest are counted

__all__ = ["CACHE_ENV", "DATA_ENV", "ClassificationData", "TranslationData", "load_text", "text_task"]


@dataclass
class Tokens:
    """Sentences as token ids, padded with 0 to the longest one; ``lengths`` counts the real tokens."""

    ids: torch.Tensor  # N x L int64
    lengths: torch.Tensor  # N int64

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, idx: torch.Tensor) -> "Tokens":
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(lengths) else 0
        return Tokens(self.ids[idx, :width], lengths)


@dataclass
class ClassificationData:
    """SST-2: training phrases and dev sentences with their labels."""

    name: str
    train: Tokens
    train_y: torch.Tensor
    test: Tokens
    test_y: torch.Tensor
    vocab_size: int
    tokenizer: str  # the tokenizer as JSON (tokenizers.Tokenizer.from_str)
    classes: tuple[str, ...] = ("negative", "positive")

    task = "classify"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ClassificationData":
        """A class-balanced subset, the same for the same ``seed`` whatever the run's seed."""
        out = self
        if n_train:
            i = balanced_indices(self.train_y, n_train, seed, "train")
            out = replace(out, train=self.train.take(i), train_y=self.train_y[i])
        if n_test:
            i = balanced_indices(self.test_y, n_test, seed, "test")
            out = replace(out, test=self.test.take(i), test_y=self.test_y[i])
        return out


@dataclass
class TranslationData:
    """Multi30k De->En: source ids end with [EOS]; target ids are [BOS] ... [EOS]."""

    name: str
    train_src: Tokens
    train_tgt: Tokens
    valid_src: Tokens
    valid_tgt: Tokens
    test_src: Tokens
    test_refs: list[str]  # the raw English sentences BLEU is scored against
    vocab_size: int
    tokenizer: str

    task = "translate"

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "TranslationData":
        out = self
        if n_train:
            i = _random_indices(len(self.train_src), n_train, seed, "train")
            out = replace(out, train_src=self.train_src.take(i), train_tgt=self.train_tgt.take(i))
        if n_test:
            i = _random_indices(len(self.test_src), n_test, seed, "test")
            out = replace(out, test_src=self.test_src.take(i), test_refs=[self.test_refs[j] for j in i.tolist()])
        return out


def _random_indices(n: int, k: int, seed: int, split: str) -> torch.Tensor:
    if not 1 <= k <= n:
        raise GammaGuideError(f"--subset for the {split} set must be between 1 and {n} (all of it), got {k}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


# ----------------------------------------------------------------------------- specs


def text_task(spec: str | None) -> str | None:
    """"classify" or "translate" for a text SPEC, None for anything else (an image SPEC)."""
    if not spec:
        return None
    return TASKS.get(spec.strip().partition(":")[0])


def load_text(spec: str, data_dir: str | os.PathLike | None = None, *, vocab_size: int = 8000,
              max_len: int = 64) -> ClassificationData | TranslationData:
    """Load a text SPEC, training the tokenizer and encoding the sentences once (cached).

    ``max_len``: sentences are cut to this many tokens (special tokens included); for
    translation, training pairs longer than that are left out instead."""
    name, _, arg = spec.strip().partition(":")
    if name not in TASKS:
        raise GammaGuideError(f"unknown text data spec {spec!r}; use sst2:PATH or multi30k:PATH")
    if vocab_size < len(SPECIALS) + 10:
        raise GammaGuideError(f"--vocab-size must be at least {len(SPECIALS) + 10}, got {vocab_size}")
    if max_len < 4:
        raise GammaGuideError(f"--max-len must be at least 4 tokens, got {max_len}")
    root = resolve_text(name, arg or None, data_dir)
    files = _files(name, root)
    key = _cache_key(root, files, vocab_size, max_len)
    path = cache_dir() / f"text-{name}-{key}.pt"
    if path.is_file():
        try:
            return _from_blob(name, root, torch.load(path, weights_only=True))
        except Exception as exc:  # a cache cut short by a crash: build it again
            warnings.warn(f"ignoring unreadable cache {path} ({type(exc).__name__}); tokenizing {root} again",
                          stacklevel=2)
    blob = (_build_sst2 if name == "sst2" else _build_multi30k)(files, vocab_size, max_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the whole cache or none
    return _from_blob(name, root, blob)


def resolve_text(name: str, path: str | None, data_dir) -> Path:
    """The folder of a text task's data: PATH itself, or under --data-dir or $GAMMAGUIDE_DATA."""
    bases = [Path(b).expanduser() for b in (data_dir, os.environ.get(DATA_ENV)) if b]
    if path:
        candidates = [Path(path).expanduser()] + [b / path for b in bases if not Path(path).is_absolute()]
    else:
        candidates = [c for b in bases for c in (b, *(b / d for d in _DEFAULT_FOLDERS[name]))]
    for c in candidates:
        if c.is_dir() and _has_train(name, c):
            return c
    tried = ", ".join(str(c) for c in candidates) or f"nothing (no PATH, no --data-dir, no ${DATA_ENV})"
    need = ("PATH/train.tsv and PATH/dev.tsv (GLUE SST-2)" if name == "sst2"
            else "PATH/raw/train.de, train.en, val.*, test_2016_flickr.* (Multi30k)")
    raise GammaGuideError(f"no {name} data found; tried {tried}. Give {name}:PATH with {need}, or set "
                          f"{DATA_ENV} to the folder holding it")


def _has_train(name: str, root: Path) -> bool:
    if name == "sst2":
        return (root / "train.tsv").is_file()
    return any((d / "train.de").is_file() for d in (root / "raw", root))


def _files(name: str, root: Path) -> dict[str, Path]:
    if name == "sst2":
        files = {"train": root / "train.tsv", "dev": root / "dev.tsv"}
    else:
        d = root / "raw" if (root / "raw" / "train.de").is_file() else root
        test = "test_2016_flickr" if (d / "test_2016_flickr.de").is_file() else "test"
        files = {f"{split}.{lang}": d / f"{stem}.{lang}"
                 for split, stem in (("train", "train"), ("valid", "val"), ("test", test)) for lang in ("de", "en")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise GammaGuideError(f"{name} data in {root} is incomplete: {', '.join(missing)} not found")
    return files


def _cache_key(root: Path, files: dict[str, Path], vocab_size: int, max_len: int) -> str:
    stats = [f"{k}={p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for k, p in sorted(files.items())]
    text = f"v{TEXT_CACHE_VERSION}|{root.resolve()}|{'|'.join(stats)}|bpe-metaspace|vocab={vocab_size}|max={max_len}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _from_blob(name: str, root: Path, blob: dict) -> ClassificationData | TranslationData:
    def tok(prefix: str) -> Tokens:
        return Tokens(blob[f"{prefix}_ids"], blob[f"{prefix}_len"])

    label = f"{name}:{root}"
    if name == "sst2":
        return ClassificationData(label, tok("train"), blob["train_y"], tok("test"), blob["test_y"],
                                  int(blob["vocab_size"]), blob["tokenizer"])
    return TranslationData(label, tok("train_src"), tok("train_tgt"), tok("valid_src"), tok("valid_tgt"),
                           tok("test_src"), list(blob["test_refs"]), int(blob["vocab_size"]), blob["tokenizer"])


# ----------------------------------------------------------------------------- reading lines


def _lines(path: Path) -> list[tuple[int, str | None]]:
    """(line number, text or None when it is not UTF-8) for every line of a file."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                out.append((number, raw.decode("utf-8").rstrip("\r\n")))
            except UnicodeDecodeError:
                out.append((number, None))
    return out


def _warn_malformed(path: Path, bad: list[tuple[int, str]]) -> None:
    if not bad:
        return
    named = "; ".join(f"line {n}: {why}" for n, why in bad[:_MAX_NAMED])
    more = f"; and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    warnings.warn(f"skipping {len(bad)} malformed line{'s' if len(bad) > 1 else ''} of {path} ({named}{more})",
                  stacklevel=3)


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and labels of a GLUE SST-2 TSV; malformed lines skipped with one warning."""
    lines = _lines(path)
    if not lines:
        raise GammaGuideError(f"{path} is empty; expected a 'sentence<TAB>label' header and one line per sentence")
    header = lines[0][1]
    if header is None or header.split("\t") != ["sentence", "label"]:
        raise GammaGuideError(f"{path} does not start with the header 'sentence<TAB>label' of GLUE SST-2 "
                              f"(found {header!r}); give the train.tsv/dev.tsv of GLUE SST-2")
    texts, labels, bad = [], [], []
    for number, text in lines[1:]:
        if text is None:
            bad.append((number, "not UTF-8"))
            continue
        fields = text.split("\t")
        if len(fields) != 2:
            bad.append((number, f"{len(fields) - 1} TABs instead of one: {text[:60]!r}"))
        elif fields[1].strip() not in ("0", "1"):
            bad.append((number, f"label {fields[1][:20]!r} is not 0 or 1"))
        elif not fields[0].strip():
            bad.append((number, "empty sentence"))
        else:
            texts.append(fields[0].strip())
            labels.append(int(fields[1]))
    _warn_malformed(path, bad)
    if not texts:
        raise GammaGuideError(f"{path} holds no well-formed line ('sentence<TAB>0 or 1')")
    return texts, labels


def read_pairs(src: Path, tgt: Path) -> list[tuple[str, str]]:
    """Aligned (source, target) sentences; a pair with an empty or non-UTF-8 side is skipped
    with one warning."""
    a, b = _lines(src), _lines(tgt)
    if len(a) != len(b):
        raise GammaGuideError(f"{src} has {len(a)} lines but {tgt} has {len(b)}: the two sides of a parallel "
                              f"corpus must have one line per sentence pair")
    pairs, bad = [], []
    for (number, s), (_, t) in zip(a, b, strict=True):
        if s is None or t is None:
            bad.append((number, "not UTF-8"))
        elif not s.strip() or not t.strip():
            bad.append((number, f"empty {'source' if not s.strip() else 'target'} sentence"))
        else:
            pairs.append((s.strip(), t.strip()))
    _warn_malformed(src, bad)
    if not pairs:
        raise GammaGuideError(f"{src} and {tgt} hold no sentence pair")
    return pairs


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A BPE tokenizer learned on ``texts``; decoding gives back space-separated text."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise GammaGuideError("text data needs the tokenizers package; run: pip install 'gammaguide[experiments]'") \
            from None
    tok = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def encode(tok, texts: list[str], *, prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = (),
           max_len: int) -> Tokens:
    """Token ids with ``prefix`` and ``suffix`` added, cut to ``max_len`` (the suffix kept)."""
    body = max_len - len(prefix) - len(suffix)
    seqs = [list(prefix) + e.ids[:body] + list(suffix) for e in tok.encode_batch(texts)]
    return _pad(seqs)


def _pad(seqs: list[list[int]]) -> Tokens:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return Tokens(ids, lengths)


def decode(tok, ids: torch.Tensor) -> list[str]:
    """Detokenized sentences from rows of ids (stopping at the first [EOS])."""
    out = []
    for row in ids.tolist():
        if EOS in row:
            row = row[:row.index(EOS)]
        out.append(tok.decode([t for t in row if t > EOS]))
    return out


# ----------------------------------------------------------------------------- building the caches


def _build_sst2(files: dict[str, Path], vocab_size: int, max_len: int) -> dict:
    train_x, train_y = read_sst2(files["train"])
    test_x, test_y = read_sst2(files["dev"])
    tok = train_tokenizer(train_x, vocab_size)
    train, test = (encode(tok, x, prefix=(CLS,), max_len=max_len) for x in (train_x, test_x))
    return {"train_ids": train.ids, "train_len": train.lengths, "train_y": torch.tensor(train_y),
            "test_ids": test.ids, "test_len": test.lengths, "test_y": torch.tensor(test_y),
            "vocab_size": tok.get_vocab_size(), "tokenizer": tok.to_str()}


def _build_multi30k(files: dict[str, Path], vocab_size: int, max_len: int) -> dict:
    splits = {s: read_pairs(files[f"{s}.de"], files[f"{s}.en"]) for s in ("train", "valid", "test")}
    train = splits["train"]
    tok = train_tokenizer([t for pair in train for t in pair], vocab_size)  # one joint De+En vocabulary
    blob: dict = {"vocab_size": tok.get_vocab_size(), "tokenizer": tok.to_str()}
    for split, pairs in splits.items():
        src = [s for s, _ in pairs]
        tgt = [t for _, t in pairs]
        if split == "train":  # cut sentences would teach truncated translations: leave long pairs out
            lens = [(len(a.ids), len(b.ids)) for a, b in zip(tok.encode_batch(src), tok.encode_batch(tgt),
                                                             strict=True)]
            keep = [i for i, (a, b) in enumerate(lens) if a + 1 <= max_len and b + 2 <= max_len]
            src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        s = encode(tok, src, suffix=(EOS,), max_len=max_len)
        blob[f"{split}_src_ids"], blob[f"{split}_src_len"] = s.ids, s.lengths
        if split == "test":
            blob["test_refs"] = tgt
        else:
            t = encode(tok, tgt, prefix=(BOS,), suffix=(EOS,), max_len=max_len)
            blob[f"{split}_tgt_ids"], blob[f"{split}_tgt_len"] = t.ids, t.lengths
    return blob
