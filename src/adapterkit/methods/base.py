"""The contract every method's module follows: compute a contribution, never combine it.

An adapter at one site is an ``AdapterModule``. It

* ``read(io)``: picks what it reads and what its contribution is combined with, ``(h, base)``,
  from what its place offers (``slots.SlotIO``). The place decides the default: ``post`` reads the
  host's output and is combined with it, ``pre`` reads and rewrites the host's input,
  ``parallel`` and ``weight`` read the host's (or sub-layer's) input and are combined with the
  host's output. A method may refine this (a Pfeiffer adapter reads the model's layer norm of
  ``y + residual``);
* ``forward(h, base)``: computes its contribution, a **delta** (zero leaves the base unchanged:
  bottleneck, LoRA) or a **factor** (one leaves it unchanged: IA3), as ``output`` declares;
* optionally offers fused shortcuts the residual-add strategy takes when nothing needs the
  contribution on its own: ``add_to(base, h, scale)`` (``base + scale * delta`` in fewer passes)
  and ``fused_site(io, scale)`` (the whole site, e.g. with the model's layer norm folded in).

How the contribution meets the base is the job of the module's ``strategy`` (``strategies.py``),
which the core attaches when it builds the module (``AdapterConfig.build_unit``); the module never
calls it itself. A slot calls ``unit.run(io)``.

Per-example routing can run several adapters of one class at one site in one batched operation:
a module class that can do that implements ``stack_key()`` (equal keys = stackable together) and
the class method ``run_stacked(units, which, io)`` (``composition/routing.py``). ``Parallel`` uses
the same method with ``which=None``: the batch is ``len(units)`` equal blocks of rows (its copies),
block ``i`` through ``units[i]``, so the weights need no per-row gather (``composition/blocks.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Hashable, Optional, Sequence

import torch
from torch import nn

from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..places.slots import Site, SlotIO
    from ..strategies import Strategy


def default_read(io: "SlotIO") -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(h, base)`` for a place: what an adapter reads there and what it is combined with."""
    if io.place == "pre":
        return io.x, io.x
    if io.place == "post":
        return io.y, io.y
    # parallel / weight: the sub-layer's input where the layout names one, else the host's input
    return (io.residual if io.residual is not None and io.place == "parallel" else io.x), io.y


class AdapterModule(nn.Module):
    """Base class of every method's per-site module (see the module docstring)."""

    #: what ``forward`` returns: ``"delta"`` (0 = unchanged) or ``"factor"`` (1 = unchanged)
    output: ClassVar[str] = "delta"
    #: the strategy ``run_stacked`` applies (routing stacks a slot only when every unit has it)
    stacked_strategy: ClassVar[str] = "add"
    strategy: "Strategy"

    #: some of its trainable parameters get no gradient in some steps (prefix tuning's MLP warm-up):
    #: DDP must then look for unused parameters
    partly_idle: bool = False

    #: the adapter's copy of the layer norm this module reads (``train_layer_norms``), in a
    #: tuple so that it is not registered twice as a submodule
    _layer_norm_copy: tuple = ()

    def read(self, io: "SlotIO") -> tuple[Optional[torch.Tensor], torch.Tensor]:
        return default_read(io)

    def use_layer_norm_copy(self, copy: nn.Module) -> None:
        """Read through the adapter's own copy of the model's layer norm at this site
        (``methods/layer_norms.py``) instead of the model's."""
        self._layer_norm_copy = (copy,)

    def layer_norm_of(self, io: "SlotIO") -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """The layer norm this module reads through at a post-LN site: its adapter's trained copy
        where it has one (``train_layer_norms``), else the model's (``io.layer_norm``), called
        without its hooks: another adapter's copy there is that adapter's business, and a routed
        call would hand it a part of the batch."""
        if self._layer_norm_copy:
            return self._layer_norm_copy[0].norm
        return io.layer_norm.forward if io.layer_norm is not None else None

    def forward(self, h: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def add_to(self, base: torch.Tensor, h: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
        """``base + scale * forward(h, base)`` in fewer passes, or ``None`` (no shortcut)."""
        return None

    def fused_site(self, io: "SlotIO", scale: float) -> Optional[torch.Tensor]:
        """The whole site's ``base + scale * delta`` at inference in fewer passes, or ``None``."""
        return None

    def compile_at(self, site: "Site") -> None:
        """Choose, once per compiled plan, the fast paths this unit may take at ``site`` (what
        cannot change between calls); the default has none."""

    def init_nonzero(self) -> None:
        """Re-initialise the part that makes a fresh contribution zero (a delta) or one (a
        factor) with small random values: a learned gate initialised at zero then makes the
        adapter the identity and gradients reach both gate and adapter."""
        raise AdapterError(f"{type(self).__name__} cannot be used with a gate strategy; use 'add' or 'scaled_add'.")

    def at_step(self, step: int, total_steps: int) -> None:
        """Told before each optimizer step (``step`` 0-based, of ``total_steps``) by ``tell_step``:
        a module whose training changes course during a run (prefix tuning's MLP warm-up) acts on
        it; the default does nothing."""

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors ``save_adapter`` writes (its ``state_dict``, or a folded form that the
        config's ``as_saved()`` builds: prefix tuning saves its prefixes without the MLP)."""
        return self.state_dict()

    def run(self, io: "SlotIO") -> torch.Tensor:
        """The new value at the site: this adapter combined by its strategy."""
        return self.strategy(self, io)

    # -- batched per-example routing (optional) --------------------------------------------------
    def stack_key(self) -> Optional[Hashable]:
        """Modules with equal keys can run as one batched operation (``run_stacked``)."""
        return None

    @classmethod
    def run_stacked(cls, units: Sequence["AdapterModule"], which: Optional[torch.Tensor],
                    io: "SlotIO") -> torch.Tensor:
        """Each example ``i`` through ``units[which[i]]``; ``which=None``: the batch is
        ``len(units)`` equal blocks of rows, block ``i`` through ``units[i]`` (``Parallel``)."""
        raise NotImplementedError  # pragma: no cover


def step_listeners(model: nn.Module) -> list["AdapterModule"]:
    """The adapter modules in ``model`` that act on ``at_step`` (those that override it): a training
    loop collects them once, as the adapter setup does not change while it trains."""
    return [m for m in model.modules()
            if isinstance(m, AdapterModule) and type(m).at_step is not AdapterModule.at_step]


def tell_step(model: "nn.Module | Sequence[AdapterModule]", step: int, total_steps: int) -> None:
    """Tell the adapter modules of ``model`` (or the ``step_listeners`` collected from it) the optimizer
    step about to be taken (a training loop calls this before each step; ``adapterkit train`` does)."""
    for module in step_listeners(model) if isinstance(model, nn.Module) else model:
        module.at_step(step, total_steps)


def gather(tensors: Sequence[torch.Tensor], which: Optional[torch.Tensor]) -> torch.Tensor:
    """``stack(tensors)[which]``: each routed example's copy of a per-adapter tensor; with
    ``which=None`` (``Parallel``'s copies) the stack itself, one row per unit."""
    stacked = torch.stack(list(tensors))
    return stacked if which is None else stacked.index_select(0, which)


def per_row(which: Optional[torch.Tensor], units: int, rows: int, device: torch.device) -> torch.Tensor:
    """``which`` itself, or for ``which=None`` (``units`` equal blocks of ``rows`` rows, block
    ``i`` through unit ``i``) each row's unit: for ``run_stacked`` code that indexes per row."""
    if which is not None:
        return which
    return torch.arange(units, device=device).repeat_interleave(rows // units)


@torch.no_grad()
def small_normal_(tensor: torch.Tensor, std: float = 0.02) -> None:
    """The non-zero init ``init_nonzero`` uses (BERT's std)."""
    nn.init.normal_(tensor, std=std)
