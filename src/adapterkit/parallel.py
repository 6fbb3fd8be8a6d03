"""The runtime of the ``Parallel`` block: replicate the batch once, split the outputs per head.

``Parallel(a, b, ...)`` (``composition.Parallel``) runs one forward pass through ``n`` adapters.
The layers below the lowest block holding one of its adapters run once, on the ``B`` examples
given; a forward pre-hook on that block replicates its input ``n`` times (``n * B`` rows: copy
``i`` is rows ``i*B .. (i+1)*B``), and pre-hooks on the blocks above replicate the per-call
tensors the model hands every block (attention mask, rotary position embeddings) that still
have ``B`` rows. At each slot the block's plan gives copy ``i`` to child ``i``. The handle then
splits the output: child ``i``'s head reads copy ``i`` (``run_parallel``). AdapterHub replicates
at the first layer instead, so nothing below is shared.

Where it applies: models whose layout knows their blocks, with one stack (encoder-decoder models
would need the decoder's inputs replicated too: refused), every adapter of the block placed
inside the blocks, at most one ``Parallel`` in a setup, at its top or in its top-level
``Stack``. Not with per-example routing, and not for ``generate`` (a cache of ``B`` rows).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from . import context
from .composition import Block, Parallel, Stack
from .errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from .layouts import Layout
    from .model import AdapterModel, AdapterRecord


def find_parallel(setup: Optional[Block]) -> Optional[Parallel]:
    """The ``Parallel`` block of a setup: the setup itself or a child of its top-level ``Stack``
    (deeper ones are refused, as is more than one)."""
    if setup is None:
        return None
    top = [setup] if isinstance(setup, Parallel) else \
        [c for c in setup.children if isinstance(c, Parallel)] if isinstance(setup, Stack) else []
    deeper = [b for b in _blocks_below(setup) if isinstance(b, Parallel) and all(b is not t for t in top)]
    if deeper or len(top) > 1:
        raise AdapterError(
            f"{setup!r}: a setup takes one Parallel block, at its top or directly in its top-level Stack "
            "(it replicates the batch for the whole model). Move it up, or split the setup."
        )
    return top[0] if top else None


def _blocks_below(block: Block) -> list[Block]:
    out = []
    for child in block.children:
        if isinstance(child, Block):
            out += [child, *_blocks_below(child)]
    return out


def first_block(parallel: Parallel, records: Mapping[str, "AdapterRecord"], layout: "Layout",
                owners: Mapping[int, tuple[str, int]]) -> tuple[str, int]:
    """``(stack, index)`` of the lowest block holding an adapter of ``parallel``; refuses what
    the module docstring says does not apply."""
    if len(layout.stacks) != 1:
        where = f"stacks {layout.stack_names}" if layout.stacks else "no transformer blocks its layout knows"
        raise AdapterError(f"{parallel!r} needs a model with one stack of blocks; this one has {where}. "
                           "Run the adapters one at a time instead.")
    placed = []
    for name in parallel.names():
        for site in records[name].sites:
            owner = owners.get(id(site.host))
            if owner is None:
                raise AdapterError(f"{parallel!r}: adapter '{name}' has a site outside the model's blocks "
                                   f"('{site.place_id}'); Parallel replicates the batch at a block. "
                                   "Place it inside the layers (layers= / target_modules=).")
            placed.append(owner)
    return min(placed, key=lambda o: o[1])


class Replicator:
    """The pre-hooks that replicate the batch for a ``Parallel`` setup (module docstring)."""

    def __init__(self) -> None:
        self._handles: list = []
        self._local = threading.local()
        self.copies = 0

    def __getstate__(self) -> dict:
        return {"_handles": [], "copies": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def update(self, blocks: Sequence[nn.Module], copies: int) -> None:
        """Hook ``blocks`` (from the lowest adapter-holding one up); no blocks: no hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.copies = [], copies
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook(first=i == 0), with_kwargs=True))

    def _hook(self, first: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            ctx = context.current()
            if ctx is not None and ctx.routing is not None:
                raise AdapterError("Per-example routing (adapter_names=) cannot run with a Parallel setup; "
                                   "activate one adapter or a Stack first.")
            hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if hidden is None:
                return None
            if first:
                self._local.rows = hidden.shape[0]
            rows = getattr(self._local, "rows", None)
            if rows is None:
                return None
            grow = lambda v: self._grow(v, rows)  # noqa: E731
            return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}

        return hook

    def _grow(self, value: Any, rows: int) -> Any:
        """``value`` repeated ``copies`` times along the batch when it has ``rows`` rows."""
        if isinstance(value, torch.Tensor):
            if value.dim() > 0 and value.shape[0] == rows:
                return value.repeat(self.copies, *([1] * (value.dim() - 1)))  # (B, ...) -> (n * B, ...)
            return value
        if isinstance(value, tuple):
            return tuple(self._grow(v, rows) for v in value)
        return value


class ParallelOutput(list):
    """One output per child of the ``Parallel`` block, in order; ``loss`` is the sum of their
    losses plus the adapters' auxiliary loss ``aux_loss`` (``None`` when no head has a loss), so
    ``output.loss.backward()`` trains every adapter and head."""

    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def head_of(child: Any, heads: Mapping[str, nn.Module]) -> Optional[str]:
    """The head a child's output goes to: the last of its adapters that has one."""
    names = [child] if isinstance(child, str) else child.names()
    with_head = [n for n in names if n in heads]
    return with_head[-1] if with_head else None


def run_parallel(model: "AdapterModel", parallel: Parallel, args: tuple, kwargs: dict,
                 labels: Optional[torch.Tensor]) -> ParallelOutput:
    """``AdapterModel.forward`` under a ``Parallel`` setup: one pass, one output per child (its
    head's output, else the wrapped model's output cut to that child's copy of the batch)."""
    n = len(parallel.children)
    heads = [head_of(c, model.heads) for c in parallel.children]
    attention_mask = kwargs.get("attention_mask")
    results = ParallelOutput()
    with context.forward(None) as ctx:
        if all(h is None for h in heads):
            if labels is not None:
                raise AdapterError("labels with a Parallel setup need a head per adapter; add them with "
                                   "add_classification_head(name, ...).")
            out = model.model(*args, **kwargs)
            results.extend(_cut(out, i, n) for i in range(n))
            return results
        backbone = getattr(model.model, "base_model", model.model)
        out = backbone(*args, **kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]  # (n * B, T, d)
        for i, name in enumerate(heads):
            part = hidden.chunk(n)[i]
            if name is None:
                results.append(part)
                continue
            loss, logits = model.heads[name](part, attention_mask, labels)
            from .model import AdapterModelOutput

            results.append(AdapterModelOutput(loss=loss, logits=logits))
    losses = [r.loss for r in results if isinstance(r, ModelOutput) and r.get("loss") is not None]
    aux = ctx.aux_loss()  # the adapters' l2_lambda penalties, over all copies at once
    results.loss = sum(losses) + (aux if aux is not None else 0.0) if losses else None
    results.aux_loss = aux
    return results


def _cut(out: Any, i: int, n: int) -> Any:
    """Copy ``i`` of every batch-sized tensor of a model output."""
    if isinstance(out, torch.Tensor):
        return out.chunk(n)[i]
    if isinstance(out, ModelOutput):
        return type(out)(**{k: _cut(v, i, n) for k, v in out.items()})
    if isinstance(out, tuple):
        return tuple(_cut(v, i, n) for v in out)
    return out
