"""The runtime of the ``Parallel`` block: replicate the batch once, split the outputs per head.

``Parallel(a, b, ...)`` (``composition.Parallel``) runs one forward pass through ``n`` adapters.
The layers below the lowest block holding one of its adapters run once, on the ``B`` examples
given. ``AdapterModel.forward`` tells the hooks the batch size (``Replicator.batch``); a forward
pre-hook on that block and on every block after it in forward order repeats ``n`` times each input tensor that still has
``B`` rows (``n * B`` rows: copy ``i`` is rows ``i*B .. (i+1)*B``): the hidden states where
the replication starts, and the per-call tensors the model hands every block (attention masks,
rotary position embeddings, the encoder's output and mask at the decoder's cross-attention).
Where the replication starts in the encoder, a pre-hook on the decoder stack as a whole
replicates its inputs (decoder ids, masks) before it builds its masks. At
each slot the block's plan gives copy ``i`` to child ``i``. The handle then splits the output:
child ``i``'s head (or the model's own LM head) reads copy ``i`` (``run_parallel``). On an
encoder-decoder whose adapters all sit in the decoder, the encoder runs once. Where the first
block's adapters all sit at its ``ffn_out`` and the sub-layer module there adds the residual and
normalises itself (BERT's ``BertOutput``; ``late_residual``), the first block runs unreplicated up
to the adapters, as AdapterHub's does: a pre-hook replicates only that module's residual argument,
and the ``Parallel`` plan at the site replicates the host's output (``blocks.Parallel``).

Labels: with a head per child, each head's loss; without heads, on a sequence-to-sequence LM
(T5, BART: ``prepare_decoder_input_ids_from_labels``), each copy's token cross-entropy over the
labels (ignoring -100), as those models compute it. ``output.loss`` is the sum.

``generate`` (``generate_parallel``) runs the wrapped model's ``generate`` on the batch repeated
``n`` times, copy ``i`` through child ``i``, and returns one result per child: a cache of ``B``
rows below the replication point and ``n * B`` above it would not fit ``generate``'s one batch,
so there the prompt's lower layers run ``n`` times (as AdapterHub's).

Where it applies: models whose layout knows their blocks, every adapter of the block placed
inside the blocks, at most one ``Parallel`` in a setup, at its top or in its top-level
``Stack``. Not with per-example routing.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Collection, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .. import context
from .blocks import Block, Parallel, Stack
from ..errors import AdapterError
from ..layouts.inputs import INPUT_KINDS
from ..places.slots import ArgRef
from ..heads import AdapterModelOutput, last_hidden, run_heads

if TYPE_CHECKING:  # pragma: no cover
    from ..layouts import Layout
    from ..model import AdapterModel
    from ..records import AdapterRecord


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
    """``(stack, index)`` of the lowest block, in forward order (stacks in the layout's order),
    holding an adapter of ``parallel``; refuses what the module docstring says does not apply."""
    if not layout.stacks:
        raise AdapterError(f"{parallel!r} needs a model whose layout knows its transformer blocks; this one has "
                           "none. Run the adapters one at a time instead.")
    placed = []
    for name in parallel.names():
        for site in records[name].sites:
            owner = owners.get(id(site.host))
            if owner is None:
                raise AdapterError(f"{parallel!r}: adapter '{name}' has a site outside the model's blocks "
                                   f"('{site.place_id}'); Parallel replicates the batch at a block. "
                                   "Place it inside the layers (layers= / target_modules=).")
            placed.append(owner)
    order = {name: i for i, name in enumerate(layout.stack_names)}
    return min(placed, key=lambda o: (order[o[0]], o[1]))


def replicated_modules(layout: "Layout", first: tuple[str, int]) -> list[nn.Module]:
    """The modules the replication hooks go on: block ``first`` (``(stack, index)``) and the
    blocks after it in its stack, then each later stack as a whole (the decoder of an
    encoder-decoder, whose own inputs and masks must have the encoder output's ``n * B`` rows
    before it builds its attention masks)."""
    stack, low = first
    names = layout.stack_names
    modules = list(layout.stacks[stack].blocks[low:])
    for later in names[names.index(stack) + 1:]:
        modules.append(layout.model.get_submodule(layout.stacks[later].root))
    return modules


def late_residual(setup: Block, parallel: Parallel, records: Mapping[str, "AdapterRecord"],
                  owners: Mapping[int, tuple[str, int]], first: tuple[str, int],
                  skip_layers: Collection[int] = ()) -> Optional[tuple[nn.Module, ArgRef]]:
    """Where block ``first`` may run unreplicated up to its adapters, as AdapterHub's does: the
    module and argument of the residual its adapters' sites read, when every site of the
    ``Parallel``'s adapters in that block is a ``post`` site at its ``ffn_out`` whose residual
    module adds that argument and applies the layer norm itself (BERT's ``BertOutput``:
    ``LayerNorm(dropout(dense(h)) + input_tensor)``), so that replicating the argument and the
    host's output replicates everything after the sites; the setup is the ``Parallel`` itself
    (a ``Stack`` member before it would meet the copies unreplicated) and the block is not in
    AdapterDrop's ``skip_layers`` (its plans, which replicate the host's output, would not run).
    ``None`` otherwise."""
    if setup is not parallel or first[1] in skip_layers:
        return None
    sites = [s for name in parallel.names() for s in records[name].sites if owners.get(id(s.host)) == first]
    residuals = {(id(s.residual_from[0]), s.residual_from[1]) for s in sites if s.residual_from is not None}
    if not sites or len(residuals) != 1:
        return None
    for s in sites:
        inside = {id(m) for m in s.residual_from[0].modules()} if s.residual_from is not None else set()
        if s.place != "post" or not s.place_id.endswith("ffn_out") or s.layer_norm is None \
                or id(s.host) not in inside or id(s.layer_norm) not in inside:
            return None
    return sites[0].residual_from


def replication(setup: Block, parallel: Parallel, records: Mapping[str, "AdapterRecord"], layout: "Layout",
                owners: Mapping[int, tuple[str, int]], skip_layers: Collection[int] = ()
                ) -> tuple[list[nn.Module], int, Optional[tuple[nn.Module, ArgRef]]]:
    """``Replicator.update``'s arguments for a ``Parallel`` setup: the blocks replicated at their
    input, the number of copies, and the residual replicated late in the first block
    (``late_residual``; its blocks then start at the next one)."""
    first = first_block(parallel, records, layout, owners)
    late = late_residual(setup, parallel, records, owners, first, skip_layers)
    if late is not None:
        first = (first[0], first[1] + 1)
    return replicated_modules(layout, first), len(parallel.children), late


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

    def update(self, blocks: Sequence[nn.Module], copies: int,
               late: Optional[tuple[nn.Module, ArgRef]] = None) -> None:
        """Hook ``blocks`` (``replicated_modules``), and ``late``'s residual argument
        (``late_residual``); none: no hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.copies = [], copies
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._hook, with_kwargs=True))
        if late is not None:  # before the slot's own pre-hook reads the residual
            module, arg = late
            self._handles.append(module.register_forward_pre_hook(self._late_hook(arg), with_kwargs=True,
                                                                  prepend=True))

    def _late_hook(self, arg: ArgRef):
        """A pre-hook replicating one argument (the residual) of the first block's sub-layer; the
        ``Parallel`` plan at its site replicates the host's output (``blocks.Parallel``)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            rows = getattr(self._local, "rows", None)
            if rows is None:
                return None
            if arg.index < len(args):
                args = args[:arg.index] + (self._grow(args[arg.index], rows),) + args[arg.index + 1:]
            elif arg.name in kwargs:
                kwargs = {**kwargs, arg.name: self._grow(kwargs[arg.name], rows)}
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def batch(self, rows: int) -> Iterator[None]:
        """Within the block, this thread's forward passes have ``rows`` examples to replicate.
        Outside it the hooks leave the inputs alone (a batch already replicated, as
        ``generate_parallel`` passes, runs through the plans as it is)."""
        self._local.rows = rows
        try:
            yield
        finally:
            self._local.rows = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict):
        rows = getattr(self._local, "rows", None)
        if rows is None:
            return None
        ctx = context.current()
        if ctx is not None and ctx.routing is not None:
            raise AdapterError("Per-example routing (adapter_names=) cannot run with a Parallel setup; "
                               "activate one adapter or a Stack first.")
        return tuple(self._grow(a, rows) for a in args), {k: self._grow(v, rows) for k, v in kwargs.items()}

    def _grow(self, value: Any, rows: int) -> Any:
        """``value`` repeated ``copies`` times along the batch when it is a batch of ``rows`` rows
        (two dimensions or more: a 1-d tensor such as ``cache_position`` is not a batch)."""
        if isinstance(value, torch.Tensor):
            if value.dim() > 1 and value.shape[0] == rows:
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


def batch_rows(args: tuple, kwargs: Mapping[str, Any]) -> int:
    """The number of examples of a call (its first batch-shaped input)."""
    inputs = [*args, *(kwargs.get(k) for k in (*INPUT_KINDS, "decoder_input_ids", "attention_mask"))]
    batch = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if batch is None:
        raise AdapterError("A Parallel setup needs the batch as a tensor (input_ids=, inputs_embeds=, ...).")
    return batch.shape[0]


def run_parallel(model: "AdapterModel", parallel: Parallel, args: tuple, kwargs: dict,
                 labels: Optional[torch.Tensor]) -> ParallelOutput:
    """``AdapterModel.forward`` under a ``Parallel`` setup: one pass, one output per child (its
    head's output, else the wrapped model's output cut to that child's copy of the batch)."""
    n = len(parallel.children)
    heads = [head_of(c, model.heads) for c in parallel.children]
    attention_mask = kwargs.get("attention_mask")
    results = ParallelOutput()
    with model._replicator.batch(batch_rows(args, kwargs)), context.forward(None) as ctx:
        if all(h is None for h in heads):
            if labels is not None:
                kwargs.setdefault("decoder_input_ids", _decoder_inputs(model, labels))
            out = model.model(*args, **kwargs)
            results.extend(_cut(out, i, n) for i in range(n))
            if labels is not None:
                for result in results:  # the token cross-entropy T5 and BART compute, per copy
                    logits = result["logits"]
                    result["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100)
        else:
            backbone = getattr(model.model, "base_model", model.model)
            hidden = last_hidden(backbone(*args, **kwargs))  # (n * B, T, d)
            outs = run_heads(model.heads, model.layout, hidden, attention_mask, heads, labels)
            for part, out in zip(hidden.chunk(n), outs):
                results.append(part if out is None else AdapterModelOutput(loss=out[0], logits=out[1]))
    losses = [r.loss for r in results if isinstance(r, ModelOutput) and r.get("loss") is not None]
    aux = ctx.aux_loss()  # the adapters' l2_lambda penalties, over all copies at once
    results.loss = sum(losses) + (aux if aux is not None else 0.0) if losses else None
    results.aux_loss = aux
    return results


def _decoder_inputs(model: "AdapterModel", labels: torch.Tensor) -> torch.Tensor:
    """A sequence-to-sequence LM's decoder inputs from ``labels`` (its own shift), or a clear error."""
    prepare = getattr(model.model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None or not getattr(model.config, "is_encoder_decoder", False):
        raise AdapterError("labels with a Parallel setup need a head per adapter (add_classification_head(name, ...)), "
                           "or a sequence-to-sequence LM (T5, BART) whose LM head the adapters share.")
    return prepare(labels=labels)


def generate_parallel(model: "AdapterModel", parallel: Parallel, args: tuple, kwargs: dict) -> list:
    """``generate`` under a ``Parallel`` setup: the wrapped model's ``generate`` on the batch
    repeated once per child, copy ``i`` through child ``i``; one result per child (the
    sequences, or the ``generate`` output cut to that child's rows). See the module docstring."""
    n = len(parallel.children)
    rows = batch_rows(args, kwargs)

    def grow(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value.repeat(n, *([1] * (value.dim() - 1)))
        return value

    out = model.model.generate(*(grow(a) for a in args), **{k: grow(v) for k, v in kwargs.items()})
    return [_cut(out, i, n) for i in range(n)]


def _cut(out: Any, i: int, n: int) -> Any:
    """Copy ``i`` of every batch-sized tensor of a model output."""
    if isinstance(out, torch.Tensor):
        return out.chunk(n)[i]
    if isinstance(out, ModelOutput):
        return type(out)(**{k: _cut(v, i, n) for k, v in out.items()})
    if isinstance(out, tuple):
        return tuple(_cut(v, i, n) for v in out)
    return out
