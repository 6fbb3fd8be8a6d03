"""Auxiliary losses of a forward (``l2_lambda``), handed to the caller.

A ``transformers`` output carries them: ``output.aux_loss``, also added to ``output.loss``. A plain
``nn.Module`` returns a tensor (or a tuple), which cannot: there the caller collects them with
``collect_aux_loss``, a context that gathers the auxiliary losses of the forwards inside it whose
outputs could not carry them (per thread and per task, like the forward context; a
``ModelOutput``'s are in its ``loss`` already, so they are not collected twice)::

    with collect_aux_loss() as aux:
        y = model(x)
        loss = F.mse_loss(y, target) + aux.total

Without such a context the loss cannot reach the caller, so the first forward that drops one warns
(``AuxLossDroppedWarning``, once per process) naming this context, instead of training silently
without the regulariser.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch


class AuxLossDroppedWarning(UserWarning):
    """An auxiliary loss (``l2_lambda``) was computed but the output could not carry it."""


@dataclass
class AuxLoss:
    """The auxiliary losses collected inside ``collect_aux_loss``: ``losses`` (one per forward
    that had one) and their sum ``total`` (a 0 tensor when there were none)."""

    losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def total(self) -> torch.Tensor:
        if not self.losses:
            return torch.zeros(())
        total = self.losses[0]
        for loss in self.losses[1:]:
            total = total + loss
        return total


_COLLECTOR: contextvars.ContextVar[Optional[AuxLoss]] = contextvars.ContextVar("adapterkit_aux_loss", default=None)
_warned = False


@contextlib.contextmanager
def collect_aux_loss() -> Iterator[AuxLoss]:
    """Collect the auxiliary losses of the forwards run inside the block (see the module docstring)."""
    collected = AuxLoss()
    token = _COLLECTOR.set(collected)
    try:
        yield collected
    finally:
        _COLLECTOR.reset(token)


def attach(output: Any, aux: Optional[torch.Tensor]) -> Any:
    """Hand ``aux`` to the caller: on a ``ModelOutput`` (``aux_loss``, added to ``loss``); on any
    other output to the innermost ``collect_aux_loss``, else warn once."""
    if aux is None:
        return output
    if isinstance(output, dict):
        if output.get("loss") is not None:
            output["loss"] = output["loss"] + aux
        output["aux_loss"] = aux
        return output
    collector = _COLLECTOR.get()
    if collector is None:
        _warn_dropped(type(output).__name__)
    else:
        collector.losses.append(aux)
    return output


def _warn_dropped(kind: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"The adapters computed an auxiliary loss (l2_lambda), but the model returned a {kind}, which cannot carry "
        "it, so it is not part of your loss. Run the forward inside `with adapterkit.collect_aux_loss() as aux:` "
        "and add aux.total to your loss (or set l2_lambda=0).",
        AuxLossDroppedWarning, stacklevel=4,
    )


__all__ = ["AuxLoss", "AuxLossDroppedWarning", "attach", "collect_aux_loss"]
