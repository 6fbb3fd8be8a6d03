"""Running the handle: its three forward modes and ``generate``.

* the active setup, with the active (or given) head or the wrapped model's own output, and
  optionally per-example routing (``adapter_names``): ``forward``;
* per-example routing with a head per example (``routed_heads=True``): ``forward_routed_heads``;
* a ``Parallel`` setup, one output per child (``composition/parallel.py``'s ``run_parallel``).

Each runs the body, then the heads through ``heads.run_heads``, inside a forward context
(``context.py``) that carries the call's routing and collects the adapters' auxiliary losses.
``AdapterModel.forward`` / ``generate`` (``model.py``) document the behaviour and call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from . import aux_loss, context
from .composition.parallel import find_parallel, generate_parallel, run_parallel
from .composition.routing import Routing, make_routing
from .errors import AdapterError
from .heads import AdapterModelOutput, RoutedHeadsOutput, last_hidden, run_heads, run_routed_heads
from .layouts.inputs import INPUT_KINDS

if TYPE_CHECKING:  # pragma: no cover
    from .model import AdapterModel


def forward(model: "AdapterModel", input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
            labels: Optional[torch.Tensor], adapter_names: Optional[Sequence[Optional[str]]], head: Optional[str],
            kwargs: dict) -> Any:
    """``AdapterModel.forward`` without ``routed_heads``."""
    head_name = head if head is not None else model.active_head
    model._require_head(head_name)
    args = _inputs(model, input_ids, attention_mask, kwargs)
    if model._replicator.copies:  # a Parallel setup: one output per child (composition/parallel.py)
        if adapter_names is not None or head is not None:
            raise AdapterError("A Parallel setup gives each adapter its own head; drop adapter_names= / head=, "
                               "or activate one adapter or a Stack.")
        return run_parallel(model, find_parallel(model.active_adapters), args, kwargs, labels)
    routing = routing_for(model, adapter_names, args[0] if args else None, kwargs) if adapter_names is not None \
        else None
    with model._routing_hooks(routing is not None), context.forward(routing, attention_mask) as ctx:
        if head_name is None:
            if labels is not None:
                kwargs["labels"] = labels
            return with_aux_loss(model.model(*args, **kwargs), ctx.aux_loss())
        backbone = getattr(model.model, "base_model", model.model)
        hidden = last_hidden(backbone(*args, **kwargs))  # (B, T, d)
        [(loss, logits)] = run_heads(model.heads, model.layout, hidden, attention_mask, [head_name], labels)
        return with_aux_loss(AdapterModelOutput(loss=loss, logits=logits), ctx.aux_loss())


def _inputs(model: "AdapterModel", input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
            kwargs: dict) -> tuple:
    """The positional inputs of the call (a plain module's input); the rest go into ``kwargs``,
    which are checked against what the model can take (``layouts/inputs.py``)."""
    args: tuple = ()
    if input_ids is not None:
        if model.config is None:
            args = (input_ids,)
        else:
            kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    model.layout.check_inputs(kwargs)  # an image or audio shape the model cannot take
    return args


def forward_routed_heads(model: "AdapterModel", input_ids: Optional[torch.Tensor],
                         attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                         adapter_names: Optional[Sequence[Optional[str]]], head: Optional[str],
                         kwargs: dict) -> RoutedHeadsOutput:
    """``AdapterModel.forward(..., routed_heads=True)``: the body once, then each example's head."""
    if adapter_names is None or labels is not None or head is not None:
        raise AdapterError("routed_heads=True takes adapter_names (one per example) and neither labels nor head; "
                           "for a loss or a single head call the model without routed_heads.")
    if model.config is None:
        raise AdapterError("routed_heads=True needs a transformers model (heads read its hidden states).")
    names = list(adapter_names) if not isinstance(adapter_names, str) else adapter_names
    _inputs(model, input_ids, attention_mask, kwargs)
    backbone = getattr(model.model, "base_model", model.model)
    routing = routing_for(model, names, None, kwargs)
    with model._routing_hooks(True), context.forward(routing, attention_mask):
        hidden = last_hidden(backbone(**kwargs))  # (B, T, d)
    return run_routed_heads(model.heads, model.layout, hidden, attention_mask, names)


def generate(model: "AdapterModel", args: tuple, adapter_names: Optional[Sequence[Optional[str]]],
             kwargs: dict) -> Any:
    """``AdapterModel.generate``."""
    if model._replicator.copies:  # one result per child of the Parallel block
        if adapter_names is not None:
            raise AdapterError("A Parallel setup runs every prompt through each of its adapters; drop "
                               "adapter_names=, or activate one adapter or a Stack.")
        return generate_parallel(model, find_parallel(model.active_adapters), args, kwargs)
    if adapter_names is None:
        return model.model.generate(*args, **kwargs)
    routing = routing_for(model, adapter_names, args[0] if args else None, kwargs)
    with model._routing_hooks(True), context.forward(routing):
        return model.model.generate(*args, **kwargs)


def routing_for(model: "AdapterModel", adapter_names: Sequence[Optional[str]], positional: Optional[torch.Tensor],
                kwargs: dict) -> Routing:
    """Check ``adapter_names`` against the adapters and the batch; the call's ``Routing``."""
    if model.merged_adapters:
        raise AdapterError(f"Per-example routing needs unmerged adapters; unmerge {model.merged_adapters} first.")
    if not isinstance(adapter_names, str):
        adapter_names = list(adapter_names)
        model._require(sorted({n for n in adapter_names if n is not None}))
    ref = model._ref_param()
    return make_routing(adapter_names, [positional, *(kwargs.get(k) for k in INPUT_KINDS)],
                        ref.device if ref is not None else None)


def with_aux_loss(output: Any, aux: Optional[torch.Tensor]) -> Any:
    """Hand the auxiliary loss to the caller (``aux_loss.attach``): on a ``ModelOutput`` (and into
    its ``loss``), or, for a plain module's tensor, to ``collect_aux_loss`` (warning once without one)."""
    return aux_loss.attach(output, aux)
