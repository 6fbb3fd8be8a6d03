"""Choosing the next token of one row: greedy, or sampled with temperature and nucleus
(``top_p``) filtering from the row's own seeded generator; and the row's log-probabilities.

Greedy (a temperature below ``GREEDY_BELOW``, as vLLM) is ``argmax`` of the raw logits, as
``generate(do_sample=False)``, so a greedy row of a continuous batch picks what the same request
picks alone. Log-probabilities are those of the model's distribution (``log_softmax`` of the raw
logits), as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

#: temperatures below this are greedy (dividing by them would overflow the logits)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """One row's settings (OpenAI's names)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's and the top k
    stop_token_ids: tuple[int, ...] = field(default=())

    def generator(self) -> Optional[torch.Generator]:
        """The row's own random stream (seeded when ``seed`` is given); ``None`` for greedy rows."""
        if self.temperature < GREEDY_BELOW:
            return None
        generator = torch.Generator()
        if self.seed is not None:
            generator.manual_seed(self.seed % 2**63)
        else:
            generator.seed()
        return generator


def choose(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """The next token from one row's logits (V,)."""
    if params.temperature < GREEDY_BELOW or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the ``top`` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top > 0 else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return float(logp[token]), pairs


__all__ = ["SamplingParams", "choose", "logprobs"]
