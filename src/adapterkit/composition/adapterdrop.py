"""AdapterDrop (Rücklé et al. 2021): adapters left out of lower layers, and no work below them.

Three parts:

* ``skip_layers``: ``set_active_adapters(setup, skip_layers=[0, 1])`` turns the active setup's
  adapters off in those layers (their slots get no plan, so no hook). Layers are counted as the
  layout counts them, within each stack (as ``layers=`` / ``leave_out=``): a site belongs to
  layer ``i`` of a stack when its host module lies inside that stack's ``i``-th block; sites
  outside the blocks are never skipped. Per-example routing (``adapter_names=``) is a per-call
  choice and ignores ``skip_layers``.
* ``GradFreeBelow``: the blocks of a stack below its lowest active adapter run under
  ``torch.no_grad``, so they record no autograd graph and the backward pass stops there, even
  when something upstream asks for gradients (``enable_input_require_grads`` for gradient
  checkpointing, an ``inputs_embeds`` with ``requires_grad``). Gradients on the adapters are
  unchanged: nothing trainable lies below. The trick stands aside while any weight of the base
  model is trainable (one below would lose its gradient), during routed calls, when an active
  adapter sits outside every block (it may be below them, e.g. at the embeddings), and in a
  later stack (T5's decoder) once an earlier one
  holds an adapter (the decoder reads the encoder's output in every layer). Gradients with
  respect to the input of a model whose lower layers hold no adapter are therefore not
  available while an adapter setup is active; ``model.disable_adapters()`` gives them back.
* ``AdapterDrop`` (its ``transformers.Trainer`` callback: ``train.adapterdrop``): robust AdapterDrop in training: each step drops the
  adapters of the first ``n`` layers, ``n`` drawn uniformly from ``0 .. max_dropped``, from a
  generator seeded by ``(seed, step)`` (a resumed run draws the same), never the global RNG.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .. import context
from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..layouts import Layout
    from ..model import AdapterModel
    from ..places.slots import Site


def block_owners(layout: "Layout") -> dict[int, tuple[str, int]]:
    """``id(module) -> (stack name, layer index)`` for every module inside a block."""
    return {id(m): (stack.name, i) for stack in layout.stacks.values()
            for i, block in enumerate(stack.blocks) for m in block.modules()}


def check_skip_layers(layout: "Layout", skip_layers: Optional[Iterable[int]]) -> frozenset[int]:
    """``skip_layers`` as a set, refused when an index is outside every stack of the model."""
    if skip_layers is None:
        return frozenset()
    if isinstance(skip_layers, (int, str)):
        raise AdapterError(f"skip_layers takes a list of layer indices, e.g. [0, 1, 2]; got {skip_layers!r}.")
    layers = list(skip_layers)
    depth = max((s.num_layers for s in layout.stacks.values()), default=0)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth]
    if bad:
        where = f"the model has {depth} layers (0 to {depth - 1})" if depth else \
            "the model has no transformer blocks its layout knows"
        raise AdapterError(f"skip_layers={bad} is outside the model: {where}. Pass indices within that range.")
    return frozenset(layers)


class GradFreeBelow:
    """Hooks that run the blocks below the lowest active adapter under ``torch.no_grad`` (see
    the module docstring). ``update`` re-places them when the setup changes; a model without
    an active adapter has none."""

    def __init__(self) -> None:
        self._handles: list = []
        self._local = threading.local()
        self.blocks: list[nn.Module] = []  # the blocks currently run without gradients

    def __getstate__(self) -> dict:
        return {"_handles": [], "blocks": []}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def update(self, layout: "Layout", owners: dict[int, tuple[str, int]], active: Sequence["Site"]) -> None:
        """Place the hooks for the ``active`` sites (``owners``: ``block_owners(layout)``)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.blocks = [], []
        if not active:
            return
        placed = [owners.get(id(site.host)) for site in active]
        if any(p is None for p in placed):
            return  # an adapter outside the blocks, perhaps below them
        for stack in layout.stacks.values():
            mine = [i for name, i in placed if name == stack.name]
            self.blocks.extend(stack.blocks[:min(mine, default=stack.num_layers)])
            if mine:
                break  # later stacks read this one's output, which now carries gradients
        params = list(layout.model.parameters())  # a trainable one anywhere below would lose its gradient
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter(params)))
            self._handles.append(block.register_forward_hook(self._exit, always_call=True))

    def _enter(self, params: list[torch.Tensor]):
        def hook(module: nn.Module, args: tuple) -> None:
            stack = self._local.__dict__.setdefault("modes", [])
            ctx = context.current()
            off = torch.is_grad_enabled() and not (ctx is not None and ctx.routing is not None) \
                and not any(p.requires_grad for p in params)
            stack.append(off)
            if off:
                torch.set_grad_enabled(False)

        return hook

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        modes = getattr(self._local, "modes", None)
        if modes and modes.pop():
            torch.set_grad_enabled(True)


class AdapterDrop:
    """Which lower layers lose their adapters at a training step (robust AdapterDrop, sec. 3):
    the first ``n`` layers, ``n`` uniform in ``0 .. max_dropped`` (default: all layers but the
    last), drawn from ``(seed, step)``."""

    def __init__(self, max_dropped: Optional[int] = None, seed: int = 0):
        if max_dropped is not None and (not isinstance(max_dropped, int) or max_dropped < 0):
            raise AdapterError(f"max_dropped must be a non-negative number of layers, got {max_dropped!r}.")
        self.max_dropped, self.seed = max_dropped, seed

    def layers(self, model: "AdapterModel", step: int) -> list[int]:
        depth = max((s.num_layers for s in model.layout.stacks.values()), default=0)
        if depth == 0:
            raise AdapterError("AdapterDrop needs a model whose layout knows its transformer blocks.")
        top = depth - 1 if self.max_dropped is None else min(self.max_dropped, depth - 1)
        n = random.Random(self.seed * 1_000_003 + step).randint(0, top)
        return list(range(n))

    def before_step(self, model: "AdapterModel", step: int) -> None:
        model.skip_layers = self.layers(model, step)

    @staticmethod
    def after_step(model: "AdapterModel") -> None:
        model.skip_layers = None
