"""Text data: the tokenizer is trained once and cached under a key of files and settings;
missing files and malformed lines; BLEU of a known example."""

from __future__ import annotations

import warnings

import pytest
import torch

from gammaguide import GammaGuideError
from gammaguide.experiments import bleu, text_data as T
from gammaguide.experiments.data import CACHE_ENV, DATA_ENV

from text_helpers import make_multi30k, make_sst2


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)


def _caches() -> list:
    return sorted(T.cache_dir().glob("text-*.pt"))


def test_sst2_is_tokenized_once_then_read_from_the_cache(tmp_path, monkeypatch):
    root = make_sst2(tmp_path / "sst2", train=300, dev=60)
    first = T.load_text(f"sst2:{root}", vocab_size=200, max_len=32)
    assert isinstance(first, T.ClassificationData) and first.task == "classify"
    assert first.train.ids.shape[0] == 300 and first.test.ids.shape[0] == 60
    assert first.train_y.tolist() == [i % 2 for i in range(300)]
    assert (first.train.ids[:, 0] == T.CLS).all()  # every sentence opens with [CLS]: never all padding
    # lengths count exactly the non-padding ids
    assert torch.equal((first.train.ids != T.PAD).sum(1), first.train.lengths)
    # decoding gives back the sentence (GLUE's trailing space stripped)
    tok = T.load_tokenizer(first.tokenizer)
    line = (root / "dev.tsv").read_text().splitlines()[1].split("\t")[0].strip()
    assert T.decode(tok, first.test.ids[:1, 1:]) == [line]
    assert len(_caches()) == 1

    def no_training(*a, **k):
        raise AssertionError("trained the tokenizer again although the cache is valid")

    monkeypatch.setattr(T, "train_tokenizer", no_training)
    again = T.load_text(f"sst2:{root}", vocab_size=200, max_len=32)
    assert torch.equal(again.train.ids, first.train.ids) and again.tokenizer == first.tokenizer


def test_the_cache_key_follows_the_files_and_the_settings(tmp_path):
    root = make_sst2(tmp_path / "sst2")
    T.load_text(f"sst2:{root}", vocab_size=200, max_len=32)
    T.load_text(f"sst2:{root}", vocab_size=200, max_len=32)
    assert len(_caches()) == 1
    T.load_text(f"sst2:{root}", vocab_size=150, max_len=32)  # another vocabulary
    T.load_text(f"sst2:{root}", vocab_size=200, max_len=24)  # another cut
    assert len(_caches()) == 3
    with open(root / "train.tsv", "a") as f:  # a changed training file
        f.write("a new and good line \t1\n")
    data = T.load_text(f"sst2:{root}", vocab_size=200, max_len=32)
    assert len(_caches()) == 4 and len(data.train_y) == 301


def test_an_unreadable_cache_is_rebuilt_with_a_warning(tmp_path):
    root = make_sst2(tmp_path / "sst2")
    T.load_text(f"sst2:{root}", vocab_size=200)
    (path,) = _caches()
    path.write_bytes(b"cut short")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        data = T.load_text(f"sst2:{root}", vocab_size=200)
    assert len(data.train_y) == 300


def test_the_path_may_come_from_gammaguide_data(tmp_path, monkeypatch):
    make_sst2(tmp_path / "data" / "sst2")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    assert len(T.load_text("sst2", vocab_size=200).train_y) == 300  # $GAMMAGUIDE_DATA/sst2
    assert len(T.load_text("sst2:sst2", vocab_size=200).train_y) == 300  # a relative PATH under it


def test_missing_files_are_named(tmp_path):
    with pytest.raises(GammaGuideError, match=r"no sst2 data found; tried .*nowhere.*GAMMAGUIDE_DATA"):
        T.load_text(f"sst2:{tmp_path / 'nowhere'}")
    root = make_sst2(tmp_path / "sst2")
    (root / "dev.tsv").unlink()
    with pytest.raises(GammaGuideError, match=r"dev\.tsv not found"):
        T.load_text(f"sst2:{root}")
    m = make_multi30k(tmp_path / "m30k")
    (m / "raw" / "val.en").unlink()
    with pytest.raises(GammaGuideError, match=r"val\.en not found"):
        T.load_text(f"multi30k:{m}")
    with pytest.raises(GammaGuideError, match="use sst2:PATH or multi30k:PATH"):
        T.load_text("imdb:/x")


def test_a_malformed_line_is_skipped_with_one_warning_naming_it(tmp_path):
    root = make_sst2(tmp_path / "sst2")
    lines = (root / "train.tsv").read_text().splitlines()
    lines[5] = "no tab on this line"  # file line 6
    lines[9] = "a sentence \t7"  # file line 10: not a label
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = T.load_text(f"sst2:{root}", vocab_size=200)
    mine = [str(w.message) for w in caught if "malformed" in str(w.message)]
    assert len(mine) == 1, mine
    assert "train.tsv" in mine[0] and "line 6" in mine[0] and "line 10" in mine[0] and "'7'" in mine[0]
    assert len(data.train_y) == 298


def test_a_file_that_is_not_sst2_is_refused(tmp_path):
    root = make_sst2(tmp_path / "sst2")
    (root / "train.tsv").write_text("index\tsentence\n0\tsomething\n")
    with pytest.raises(GammaGuideError, match="header 'sentence<TAB>label'"):
        T.load_text(f"sst2:{root}")


def test_multi30k_pairs_references_and_errors(tmp_path):
    root = make_multi30k(tmp_path / "m30k", train=200, valid=30, test=20)
    de = (root / "raw" / "train.de").read_text().splitlines()
    de[3] = "   "  # an empty source sentence on line 4
    (root / "raw" / "train.de").write_text("\n".join(de) + "\n")
    with pytest.warns(UserWarning, match=r"1 malformed line of .*train\.de \(line 4: empty source sentence\)"):
        data = T.load_text(f"multi30k:{root}", vocab_size=150, max_len=32)
    assert isinstance(data, T.TranslationData) and len(data.train_src) == 199
    assert (data.train_tgt.ids[:, 0] == T.BOS).all()
    ends = data.train_tgt.ids[torch.arange(len(data.train_tgt)), data.train_tgt.lengths - 1]
    assert (ends == T.EOS).all()
    assert data.test_refs == (root / "raw" / "test_2016_flickr.en").read_text().splitlines()
    tok = T.load_tokenizer(data.tokenizer)
    assert T.decode(tok, data.valid_tgt.ids[:2, 1:]) == (root / "raw" / "val.en").read_text().splitlines()[:2]
    with open(root / "raw" / "val.en", "a") as f:
        f.write("One line too many.\n")
    with pytest.warns(UserWarning, match="1 malformed line"):  # train.de is still read first
        with pytest.raises(GammaGuideError, match=r"val\.de has 30 lines but .*val\.en has 31"):
            T.load_text(f"multi30k:{root}", vocab_size=150, max_len=32)


def test_bleu_of_a_known_example():
    # One sentence, same length (no brevity penalty): n-gram precisions 5/6, 4/5, 3/4, 2/3,
    # so BLEU = 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * (1/3) ** (1/4).
    score = bleu.corpus_bleu(["a b c d e f"], ["a b c d e g"])
    assert score.score == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-6)
    assert score.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert bleu.corpus_bleu(["The dog runs.", "A man."], ["The dog runs.", "A man."]).score == pytest.approx(100)
    with pytest.raises(GammaGuideError, match="2 hypotheses for 1 references"):
        bleu.corpus_bleu(["a", "b"], ["a"])
