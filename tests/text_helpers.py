"""Helpers for the text tests: a tiny SST-2 and a tiny Multi30k made on the spot."""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ["good", "great", "charming", "moving", "funny", "smart", "warm", "lovely"]
NEGATIVE = ["bad", "dull", "boring", "awful", "flat", "tired", "stale", "clumsy"]
FILLER = ["the", "film", "is", "a", "story", "of", "and", "with", "cast", "plot", "it", "'s", "."]

# A word-for-word "German" -> "English" dictionary: a tiny model can learn it.
LEXICON = {"ein": "a", "der": "the", "hund": "dog", "mann": "man", "frau": "woman", "kind": "child",
           "läuft": "runs", "sitzt": "sits", "spielt": "plays", "im": "in the", "park": "park", "rot": "red",
           "blau": "blue", "ball": "ball", "mit": "with", "auf": "on", "gras": "grass", "und": "and"}


def _sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
    mood = POSITIVE if label else NEGATIVE
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(mood))
    return " ".join(words)


def make_sst2(root: Path, train: int = 300, dev: int = 60, seed: int = 0) -> Path:
    """root/{train,dev}.tsv in GLUE's format (header, trailing space before the TAB)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("dev", dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            lines.append(f"{_sentence(rng, label)} \t{label}")
        (root / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_multi30k(root: Path, train: int = 300, valid: int = 40, test: int = 40, seed: int = 0) -> Path:
    """root/raw/{train,val,test_2016_flickr}.{de,en}: aligned, capitalised, with a full stop."""
    rng = random.Random(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    words = list(LEXICON)
    for stem, n in (("train", train), ("val", valid), ("test_2016_flickr", test)):
        de, en = [], []
        for _ in range(n):
            src = [rng.choice(words) for _ in range(rng.randint(3, 9))]
            de.append(" ".join(src).capitalize() + ".")
            en.append(" ".join(LEXICON[w] for w in src).capitalize() + ".")
        (raw / f"{stem}.de").write_text("\n".join(de) + "\n", encoding="utf-8")
        (raw / f"{stem}.en").write_text("\n".join(en) + "\n", encoding="utf-8")
    return root
