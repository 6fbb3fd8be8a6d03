"""Run a model over encoded data without gradients, and turn its outputs into metrics.

Examples are sorted by length before batching (little padding) and run under
``torch.inference_mode``; with several processes each runs a strided shard and the outputs are
gathered. Each example yields one 1-D tensor: class logits, a regression value, per-token
logits (tagging, flattened), ``[loss sum, token count]`` (causal LM), the log-probability of
each label's answer (``lm-classification``, ``choices.choice_scores``) or the most probable token
of every real frame (``ctc``, read by greedy decoding).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Encoded, TaskSpec
from ..data.ctc import Vocabulary, greedy_ids
from ..data.verbalizer import gold_class, prompt_of
from . import metrics as M
from .batches import collate
from .choices import choice_scores
from .distributed import DistEnv, gather_rows
from .wer import ctc_metrics


@torch.inference_mode()
def run_outputs(
    model: nn.Module,
    enc: Encoded,
    spec: TaskSpec,
    *,
    batch_size: int,
    pad_id: int,
    env: DistEnv = DistEnv(),
    device: Optional[torch.device] = None,
) -> list[torch.Tensor]:
    """One output tensor per example of ``enc``, in order (see module docstring)."""
    was_training = model.training
    model.eval()
    try:
        mine = list(range(env.rank, len(enc), env.world_size))
        if spec.task == "lm-classification":
            assert enc.choices is not None
            prompts = [prompt_of(enc.input_ids[i], enc.labels[i] if enc.labels else None) for i in mine]
            scores = choice_scores(model, prompts, enc.choices, batch_size=batch_size, pad_id=pad_id, device=device)
            return gather_rows(env, list(scores.float()), len(enc))
        lengths = enc.lengths()
        order = sorted(range(len(mine)), key=lambda k: lengths[mine[k]])
        rows: list[Optional[torch.Tensor]] = [None] * len(mine)
        for start in range(0, len(order), batch_size):
            ks = order[start : start + batch_size]
            batch = collate(enc, [mine[k] for k in ks], spec.task, pad_id, with_labels=spec.task == "causal-lm")
            labels = batch.pop("labels", None)
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits.float()
            if spec.task == "causal-lm":
                out = _causal_rows(logits, labels.to(logits.device))
            elif spec.task == "ctc":  # frames -> ids, over each clip's own frames only
                frames = model.layout.hidden_mask(batch.get("attention_mask"), logits)
                out = [torch.tensor(ids, dtype=torch.float32) for ids in greedy_ids(logits, frames)]
            elif spec.task == "tagging":
                out = [logits[b, : len(enc.input_ids[mine[k]])].reshape(-1) for b, k in enumerate(ks)]
            else:
                out = list(logits.reshape(len(ks), -1))
            for k, row in zip(ks, out):
                rows[k] = row.cpu()
        return gather_rows(env, rows, len(enc))  # type: ignore[arg-type]
    finally:
        model.train(was_training)


def _causal_rows(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    # (B, T, V) predicts (B, T) shifted by one
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")  # (B, T-1)
    mask = (shift_labels != -100).float()
    return [torch.stack([(loss[b] * mask[b]).sum(), mask[b].sum()]) for b in range(loss.shape[0])]


def compute_metrics(spec: TaskSpec, rows: list[torch.Tensor], enc: Encoded) -> dict[str, float]:
    """Metrics of the task (``metrics.metric_names``) from ``run_outputs`` rows and gold labels."""
    if spec.task == "causal-lm":
        stacked = torch.stack(rows)
        return M.causal_metrics(stacked[:, 0].sum().item(), int(stacked[:, 1].sum().item()))
    if spec.task == "ctc":
        vocab = Vocabulary(tuple(spec.labels))
        return ctc_metrics(enc.texts, [vocab.decode(row.long().tolist()) for row in rows])
    if spec.task == "tagging":
        pred, gold = [], []
        for row, labels in zip(rows, enc.labels):
            logits = row.view(-1, len(spec.labels))
            keep = [t for t, g in enumerate(labels) if g != -100 and t < logits.shape[0]]
            pred.append(logits[keep].argmax(-1).tolist())
            gold.append([labels[t] for t in keep])
        return M.tagging_metrics(pred, gold, spec.labels)
    logits = torch.stack(rows)
    if spec.task == "lm-classification":
        assert enc.choices is not None
        gold = [gold_class(labels, enc.choices) for labels in enc.labels]
        return M.classification_metrics(logits, torch.tensor(gold, dtype=torch.long))
    if spec.task == "classification":
        return M.classification_metrics(logits, torch.tensor(enc.labels, dtype=torch.long))
    if spec.task == "multilabel":
        return M.multilabel_metrics(logits, torch.tensor(enc.labels, dtype=torch.float32), spec.threshold)
    scale = lambda t: t * spec.target_std + spec.target_mean  # noqa: E731
    return M.regression_metrics(scale(logits[:, 0].double()), scale(torch.tensor(enc.labels, dtype=torch.float64)))


def evaluate(model: nn.Module, enc: Encoded, spec: TaskSpec, *, batch_size: int, pad_id: int,
             env: DistEnv = DistEnv(), device: Optional[torch.device] = None) -> dict[str, float]:
    rows = run_outputs(model, enc, spec, batch_size=batch_size, pad_id=pad_id, env=env, device=device)
    return compute_metrics(spec, rows, enc)
