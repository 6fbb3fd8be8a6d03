"""Evaluation metrics per task, which one selects the best adapter, and ``metrics.jsonl``.

* classification: ``accuracy`` (selects), ``macro_f1``, ``loss``;
* multilabel: ``micro_f1`` (selects), ``macro_f1``, ``subset_accuracy`` (all labels right), ``loss``;
  a label is predicted when its sigmoid is >= 0.5;
* regression: ``pearson`` (selects, as GLUE STS-B), ``spearman``, ``mse`` and ``rmse`` in the
  label's own units;
* tagging: ``span_f1`` (selects; exact-match entity spans, CoNLL style) when the tags are
  BIO / IOB2 (``B-X``, ``I-X``, ``O``), else ``macro_f1`` over tags; also ``token_accuracy``;
* causal-lm: ``loss`` (selects; mean cross-entropy per predicted token) and ``perplexity``;
* lm-classification: as classification, from the LM's log-probability of each label's answer
  (``loss`` is the cross-entropy of those scores renormalised over the labels);
* ctc (speech recognition): ``wer`` (selects; word error rate of greedy CTC decoding), ``cer``
  and ``sentence_accuracy`` (``wer.py``).

``--metric`` picks another one; ``loss``, ``mse``, ``rmse``, ``perplexity``, ``wer`` and ``cer`` are
better lower.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data import TaskSpec

LOWER_IS_BETTER = {"loss", "mse", "rmse", "perplexity", "wer", "cer"}


def primary_metric(spec: TaskSpec) -> str:
    if spec.task == "tagging":
        return "span_f1" if is_bio(spec.labels) else "macro_f1"
    return {"classification": "accuracy", "multilabel": "micro_f1", "regression": "pearson",
            "causal-lm": "loss", "lm-classification": "accuracy", "ctc": "wer"}[spec.task]


def metric_names(spec: TaskSpec) -> list[str]:
    return {
        "classification": ["accuracy", "macro_f1", "loss"],
        "multilabel": ["micro_f1", "macro_f1", "subset_accuracy", "loss"],
        "regression": ["pearson", "spearman", "mse", "rmse"],
        "tagging": ["span_f1", "macro_f1", "token_accuracy"] if is_bio(spec.labels) else ["macro_f1", "token_accuracy"],
        "causal-lm": ["loss", "perplexity"],
        "lm-classification": ["accuracy", "macro_f1", "loss"],
        "ctc": ["wer", "cer", "sentence_accuracy"],
    }[spec.task]


def better(metric: str, new: float, old: Optional[float]) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new < old if metric in LOWER_IS_BETTER else new > old


def is_bio(labels: Sequence[str]) -> bool:
    return any(l.startswith(("B-", "I-")) for l in labels) and all(l == "O" or l[:2] in ("B-", "I-") for l in labels)


# -- per-task metrics ------------------------------------------------------------------------------
def f1_per_class(pred: Sequence[int], gold: Sequence[int], num: int) -> list[float]:
    tp, fp, fn = [0] * num, [0] * num, [0] * num
    for p, g in zip(pred, gold):
        if p == g:
            tp[p] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    out = []
    for c in range(num):
        denom = 2 * tp[c] + fp[c] + fn[c]
        out.append(2 * tp[c] / denom if denom else 0.0)
    return out


def classification_metrics(logits: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(-1)
    present = sorted(set(gold.tolist()) | set(pred.tolist()))
    f1 = f1_per_class(pred.tolist(), gold.tolist(), logits.shape[-1])
    return {
        "accuracy": (pred == gold).float().mean().item(),
        "macro_f1": sum(f1[c] for c in present) / len(present),
        "loss": F.cross_entropy(logits, gold).item(),
    }


def multilabel_metrics(logits: torch.Tensor, gold: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    pred = (torch.sigmoid(logits) >= threshold).float()
    tp = (pred * gold).sum(0)
    fp = (pred * (1 - gold)).sum(0)
    fn = ((1 - pred) * gold).sum(0)
    micro_denom = (2 * tp.sum() + fp.sum() + fn.sum()).item()
    per = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    present = (gold.sum(0) + pred.sum(0)) > 0
    return {
        "micro_f1": 2 * tp.sum().item() / micro_denom if micro_denom else 0.0,
        "macro_f1": per[present].mean().item() if present.any() else 0.0,
        "subset_accuracy": (pred == gold).all(-1).float().mean().item(),
        "loss": F.binary_cross_entropy_with_logits(logits, gold).item(),
    }


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman needs."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    xs = x[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt((a * a).sum().item() * (b * b).sum().item())
    return (a * b).sum().item() / denom if denom > 0 else float("nan")


def regression_metrics(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    mse = ((pred.double() - gold.double()) ** 2).mean().item()
    return {
        "pearson": _pearson(pred, gold),
        "spearman": _pearson(_ranks(pred), _ranks(gold)),
        "mse": mse,
        "rmse": math.sqrt(mse),
    }


def spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans ``(start, end, type)`` of a BIO / IOB2 sequence (an I- after O starts one)."""
    out, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        boundary = tag == "O" or tag.startswith("B-") or (tag.startswith("I-") and tag[2:] != kind)
        if boundary and start is not None:
            out.add((start, i, kind))
            start, kind = None, None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start, kind = i, tag[2:]
    return out


def tagging_metrics(pred: list[list[int]], gold: list[list[int]], labels: Sequence[str]) -> dict[str, float]:
    flat_p = [p for seq in pred for p in seq]
    flat_g = [g for seq in gold for g in seq]
    present = sorted(set(flat_g) | set(flat_p))
    f1 = f1_per_class(flat_p, flat_g, len(labels))
    out = {
        "macro_f1": sum(f1[c] for c in present) / max(1, len(present)),
        "token_accuracy": sum(p == g for p, g in zip(flat_p, flat_g)) / max(1, len(flat_g)),
    }
    if is_bio(labels):
        tp = n_pred = n_gold = 0
        for p, g in zip(pred, gold):
            sp, sg = spans([labels[i] for i in p]), spans([labels[i] for i in g])
            tp += len(sp & sg)
            n_pred += len(sp)
            n_gold += len(sg)
        out = {"span_f1": 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0, **out}
    return out


def causal_metrics(loss_sum: float, count: int) -> dict[str, float]:
    loss = loss_sum / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# -- metrics.jsonl ---------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON object per line; ``offset()`` / ``truncate()`` let a resumed run drop the
    records written after its last checkpoint (they will be written again, identically)."""

    def __init__(self, path: "str | Path", enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        if enabled and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    self.records.append(json.loads(line))

    def write(self, record: dict[str, Any]) -> None:
        record = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in record.items()}
        self.records.append(record)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def offset(self) -> int:
        return self.path.stat().st_size if self.enabled and self.path.exists() else 0

    def count(self) -> int:
        return len(self.records)

    def truncate(self, offset: int, count: int) -> None:
        self.records = self.records[:count]
        if self.enabled and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)
