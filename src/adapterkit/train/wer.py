"""Word and character error rates of speech recognition (``--task ctc``).

WER = (substitutions + deletions + insertions) / reference words, summed over the whole set
before dividing (corpus WER, as ``jiwer`` and ``evaluate``'s ``wer`` compute it), so long
references weigh more than short ones. CER is the same over characters (spaces included, after
collapsing runs of whitespace). Both can exceed 1 when the hypothesis inserts a lot.
"""

from __future__ import annotations

from typing import Sequence


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (one row of the table at a time)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, start=1):
        row = [i]
        for j, hyp in enumerate(hypothesis, start=1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = row
    return previous[-1]


def _rate(pairs: Sequence[tuple[Sequence[str], Sequence[str]]]) -> float:
    errors = sum(edit_distance(ref, hyp) for ref, hyp in pairs)
    total = sum(len(ref) for ref, _ in pairs)
    return errors / total if total else 0.0


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return _rate([(r.split(), h.split()) for r, h in zip(references, hypotheses)])


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return _rate([(list(" ".join(r.split())), list(" ".join(h.split()))) for r, h in zip(references, hypotheses)])


def ctc_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``wer`` (selects the best adapter), ``cer`` and ``sentence_accuracy`` (exact transcripts)."""
    exact = sum(" ".join(r.split()) == " ".join(h.split()) for r, h in zip(references, hypotheses))
    return {"wer": word_error_rate(references, hypotheses), "cer": char_error_rate(references, hypotheses),
            "sentence_accuracy": exact / len(references) if references else 0.0}


__all__ = ["edit_distance", "word_error_rate", "char_error_rate", "ctc_metrics"]
