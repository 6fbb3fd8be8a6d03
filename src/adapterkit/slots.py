"""Sites and slots: where adapters meet the frozen model, and how they run there.

A ``Site`` describes one place in the model: the *host* module whose forward the adapter
rewrites, plus, for transformer sub-layers, where the residual stream comes from and the
layer norm that follows. A ``Slot`` is the runtime at one site: a forward hook on the host that
calls the active *plan* (a function ``SlotIO -> Tensor`` compiled from the active composition
when the setup changes). With no plan, the slot removes its hooks, so the model runs exactly
the code it had before: adapters off means the base model, bit for bit.

Every adapter module receives a ``SlotIO`` and returns the new host output:

* ``x``: the host's input (first positional argument),
* ``y``: the host's output (first element when the host returns a tuple),
* ``residual``: the residual stream entering the sub-layer, captured by a pre-hook
  (``None`` at sites without one),
* ``layer_norm``: the model's layer norm that follows the sub-layer (post-LN models only).

Hooks instead of copied model code keep us independent of ``transformers`` versions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import nn

Plan = Callable[["SlotIO"], torch.Tensor]


@dataclass(frozen=True)
class ArgRef:
    """An argument of a module's forward: by position, or by keyword as a fallback."""

    index: int
    name: str

    def pick(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        if len(args) > self.index:
            return args[self.index]
        return kwargs.get(self.name)


@dataclass(frozen=True)
class Site:
    """One place an adapter can occupy.

    Args:
        place_id: stable name, relative to the layout (``"layers.3.ffn_out"``,
            ``"layers.3.attention.self.query"``) or the module path on the generic path.
        host: module whose output the adapter rewrites.
        layer: layer index, when the site belongs to a layer.
        in_features / out_features: host input and output widths.
        residual_from: module and argument holding the residual stream of this sub-layer.
        layer_norm: the model's layer norm applied after the residual add (post-LN models).
        place: how the adapter meets the host: ``"post"`` (reads and rewrites the host's
            output), ``"pre"`` (rewrites the host's input), ``"parallel"`` (reads the host's or the
            sub-layer's input, adds to the host's output) or ``"weight"`` (inside a Linear's own
            product: LoRA, IA3). ``"attention"`` and ``"input"`` are reserved for prefix and
            prompt tuning.
        stack: the named stack (``"encoder"`` / ``"decoder"``) the site belongs to, if any.
        input_from: module and argument holding the sub-layer's input (what a ``pre`` /
            ``parallel`` adapter at a sub-layer site reads), where the layout knows it.
    """

    place_id: str
    host: nn.Module
    in_features: int
    out_features: int
    layer: Optional[int] = None
    residual_from: Optional[tuple[nn.Module, ArgRef]] = None
    layer_norm: Optional[nn.Module] = None
    place: str = "post"
    stack: Optional[str] = None
    input_from: Optional[tuple[nn.Module, ArgRef]] = None

    @property
    def key(self) -> str:
        """``place_id`` usable as an ``nn.ModuleDict`` key (no dots)."""
        return self.place_id.replace(".", "-")

    def weight_shape(self) -> list[int]:
        weight = getattr(self.host, "weight", None)
        return list(weight.shape) if isinstance(weight, torch.Tensor) else [self.out_features, self.in_features]


@dataclass(frozen=True)
class SlotIO:
    """What an adapter sees at a site (see module docstring)."""

    x: torch.Tensor
    y: torch.Tensor
    residual: Optional[torch.Tensor] = None
    layer_norm: Optional[nn.Module] = None

    def rows(self, index: torch.Tensor) -> "SlotIO":
        """The same view restricted to some examples of the batch (per-example routing)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return replace(self, x=pick(self.x), y=pick(self.y), residual=pick(self.residual))

    def with_y(self, y: torch.Tensor) -> "SlotIO":
        return replace(self, y=y)


class Slot:
    """Runtime at one site: hooks installed only while a plan is active."""

    def __init__(self, site: Site):
        self.site = site
        self.plan: Optional[Plan] = None
        self._handles: list = []
        self._residual: Optional[torch.Tensor] = None

    def set_plan(self, plan: Optional[Plan]) -> None:
        """Install (or, with ``None``, remove) the hooks that run ``plan``."""
        self.plan = plan
        if plan is None:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._residual = None
            return
        if self._handles:
            return  # hooks already there; they read self.plan at call time
        if self.site.residual_from is not None:
            module, _ = self.site.residual_from
            self._handles.append(module.register_forward_pre_hook(self._capture, with_kwargs=True))
        # Weight-level adapters (LoRA, IA3) belong to the host's own computation, so they run
        # before sub-layer adapters that share the host (Llama's o_proj is both).
        prepend = self.site.place == "weight"
        self._handles.append(self.site.host.register_forward_hook(self._run, with_kwargs=True, prepend=prepend))

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._residual = self.site.residual_from[1].pick(args, kwargs)

    def _run(self, module: nn.Module, args: tuple, kwargs: dict, output):
        y = output[0] if isinstance(output, tuple) else output
        x = args[0] if args else next(iter(kwargs.values()), None)
        io = SlotIO(x=x, y=y, residual=self._residual, layer_norm=self.site.layer_norm)
        self._residual = None
        new_y = self.plan(io)
        return (new_y, *output[1:]) if isinstance(output, tuple) else new_y
