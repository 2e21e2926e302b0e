"""Corpus BLEU with sacrebleu, on detokenized hypotheses against the raw references.

sacrebleu applies its own standard tokenization (13a) to both sides, so scores are comparable
with published sacrebleu numbers on the same test set; its *signature* says exactly how a score
was computed and is recorded with every score.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GammaGuideError


@dataclass(frozen=True)
class Bleu:
    score: float  # 0-100
    signature: str  # e.g. nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0


def available() -> bool:
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        return False
    return True


def corpus_bleu(hypotheses: list[str], references: list[str]) -> Bleu:
    """BLEU of one hypothesis per reference (one reference each)."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise GammaGuideError("BLEU needs the sacrebleu package; run: pip install 'gammaguide[experiments]'") \
            from None
    if len(hypotheses) != len(references):
        raise GammaGuideError(f"{len(hypotheses)} hypotheses for {len(references)} references: give one "
                              f"hypothesis per reference sentence")
    metric = BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return Bleu(float(score.score), str(metric.get_signature()))
