"""The forward context: per-call state, held in a ``contextvars.ContextVar`` for one forward.

``AdapterModel.forward`` opens one (``with context.forward(...)``); the slots' hooks read it.
What lives here belongs to one call, never to the model, so several threads can run one model
at once with different ``adapter_names`` and each get what it would get alone (AdapterHub keeps
the same in a thread-local ``ForwardContext``):

* ``routing``: which adapter each example of the batch goes to (``routing.Routing``), or ``None``;
* ``aux_losses``: auxiliary losses the strategies add while training (``l2_lambda``);
* ``prompt_length``: the number of positions the input place prepended in this call (``places/input.py``; 0 without a prompt).
* ``attention_mask``: the call's ``(B, T)`` attention mask (or ``None``), from which adapters acting
  at chosen token positions find each example's first and last real tokens (``Site.positions``).

Hooks that run outside any context (the wrapped model called directly) see ``current() is None``
and run the active setup; their auxiliary losses are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .composition.routing import Routing


@dataclass
class ForwardContext:
    routing: Optional["Routing"] = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    prompt_length: int = 0
    attention_mask: Optional[torch.Tensor] = None

    def aux_loss(self) -> Optional[torch.Tensor]:
        """The sum of the auxiliary losses, or ``None`` when there are none."""
        if not self.aux_losses:
            return None
        total = self.aux_losses[0]
        for loss in self.aux_losses[1:]:
            total = total + loss
        return total


_CURRENT: contextvars.ContextVar[Optional[ForwardContext]] = contextvars.ContextVar("adapterkit_forward", default=None)


def current() -> Optional[ForwardContext]:
    return _CURRENT.get()


@contextlib.contextmanager
def forward(routing: Optional["Routing"] = None,
            attention_mask: Optional[torch.Tensor] = None) -> Iterator[ForwardContext]:
    """A fresh context for the duration of one forward (nested calls get their own)."""
    ctx = ForwardContext(routing=routing, attention_mask=attention_mask)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def add_aux_loss(loss: torch.Tensor) -> None:
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.aux_losses.append(loss)
