"""Scoring a causal LM's answer choices: log P(answer | prompt), summed over the answer's tokens.

This is how ``lm-classification`` predicts (``data/verbalizer.py``): every label's answer is
scored after the prompt and the largest score wins. The LM is run through its normal forward
(any adapter method, or none for the bare model's zero-shot accuracy). Answers that share all
but their last token share one forward pass: with one-token answers (`` positive`` /
`` negative``) each prompt is run once and every answer is read from its last position.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..data import Encoded
from .batches import collate


@torch.inference_mode()
def choice_scores(model: nn.Module, prompts: Sequence[Sequence[int]], choices: Sequence[Sequence[int]], *,
                  batch_size: int, pad_id: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``(N, K)``: for prompt n and answer k, ``sum_j log P(answer_k[j] | prompt_n + answer_k[:j])``."""
    # one job per (prompt, answer prefix): the sequence to run and the answers read from it
    jobs: list[tuple[int, list[int], int, list[int]]] = []  # (row, input ids, first answer position - 1, answers)
    for n, prompt in enumerate(prompts):
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, answer in enumerate(choices):
            groups.setdefault(tuple(answer[:-1]), []).append(k)
        jobs += [(n, list(prompt) + list(prefix), len(prompt) - 1, ks) for prefix, ks in groups.items()]
    scores = torch.zeros(len(prompts), len(choices), dtype=torch.float64)
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))
    seqs = Encoded([job[1] for job in jobs], [])
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        batch = collate(seqs, part, "causal-lm", pad_id, with_labels=False)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits  # (B, T, V)
        for b, j in enumerate(part):
            n, _, first, ks = jobs[j]
            for k in ks:
                answer = torch.tensor(choices[k], device=logits.device)
                rows = logits[b, first : first + len(answer)].float().log_softmax(-1)  # (len(answer), V)
                scores[n, k] = rows.gather(-1, answer[:, None]).sum().item()
    return scores
