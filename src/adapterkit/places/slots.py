"""Sites and slots: where adapters meet the frozen model, and how they run there.

A ``Site`` describes one place in the model: the *host* module the adapter meets, how it
meets it (``place``: ``post``, ``pre``, ``parallel``, ``weight``), plus, for transformer
sub-layers, where the residual stream comes from and the layer norm that follows. A ``Slot`` is
the runtime at one site: a hook on the host (a forward hook; a forward pre-hook at a ``pre``
place) that calls a *plan* (a function ``SlotIO -> Tensor`` compiled when the setup changes).
With no plan, the slot removes its hooks, so the model runs exactly the code it had before:
adapters off means the base model, bit for bit.

A plan receives a ``SlotIO`` and returns the site's new value (the host's output, or its input
at a ``pre`` place):

* ``x``: the host's input (first positional argument, else first tensor keyword argument),
* ``y``: the host's output (first element when the host returns a tuple; ``None`` at ``pre``),
* ``residual``: the residual stream entering the sub-layer, captured by a pre-hook
  (``None`` at sites without one),
* ``layer_norm``: the model's layer norm that follows the sub-layer (post-LN models only),
* ``place``: the site's place,
* ``layers``: the outputs of the blocks the site taps (``Site.layers_from``: an L-adapter at a
  stack's output reads every layer's output), captured by forward hooks on those blocks during
  the same forward; ``()`` elsewhere.

A host that returns a ``transformers`` ``ModelOutput`` (a stack's encoder module) offers its
first field (``last_hidden_state``) as ``y``, and gets it replaced in a copy.

Hooks instead of copied model code keep us independent of ``transformers`` versions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .. import context

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
            product: LoRA, IA3), ``"attention"`` (key / value prefixes inside the attention
            of every ``members`` module: prefix tuning, ``places/attention.py``) or ``"input"``
            (rows prepended to the model's input sequence: prompt tuning, run by
            ``places/input.InputSlot``).
        stack: the named stack (``"encoder"`` / ``"decoder"``) the site belongs to, if any.
        input_from: module and argument holding the sub-layer's input (what a ``pre`` /
            ``parallel`` adapter at a sub-layer site reads), where the layout knows it.
        layers_from: blocks whose outputs the slot captures for the host's hook
            (``SlotIO.layers``), in order; ``()`` = none.
        members: the modules a site spans, block by block (an ``attention`` site: its attention
            module in every block of its stack; ``host`` is then the stack itself).
        positions: ``(first, last)``: the adapter acts on each example's first ``first`` and last
            ``last`` real tokens only (LoReFT's interventions), found from the call's attention
            mask (``SlotIO.attention_mask``, ``token_positions``); ``None`` = every position.
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
    layers_from: tuple[nn.Module, ...] = ()
    members: tuple[nn.Module, ...] = ()
    positions: Optional[tuple[int, int]] = None

    def at(self, place: str) -> "Site":
        """This site as an adapter at ``place`` meets it. A ``pre`` adapter at a sub-layer site
        rewrites the sub-layer's input, so its host becomes the module that reads that input."""
        if place == "pre" and self.input_from is not None:
            return replace(self, place=place, host=self.input_from[0], residual_from=None, layer_norm=None)
        return replace(self, place=place)

    @property
    def key(self) -> str:
        """``place_id`` usable as an ``nn.ModuleDict`` key (no dots)."""
        return self.place_id.replace(".", "-")

    def weight_shape(self) -> list[int]:
        weight = getattr(self.host, "weight", None)
        return list(weight.shape) if isinstance(weight, torch.Tensor) else [self.out_features, self.in_features]


#: places whose value is the host's input (rewritten in place of it): ``pre``, and ``input``, whose
#: value is the whole input sequence
_INPUT_VALUED = ("pre", "input")


@dataclass(frozen=True)
class SlotIO:
    """What an adapter sees at a site (see module docstring)."""

    x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    residual: Optional[torch.Tensor] = None
    layer_norm: Optional[nn.Module] = None
    place: str = "post"
    layers: tuple[torch.Tensor, ...] = ()
    attention_mask: Optional[torch.Tensor] = None  # the call's (B, T) mask, where the site needs positions

    @property
    def passthrough(self) -> torch.Tensor:
        """The value the site carries on unchanged when no adapter acts on it."""
        return self.x if self.place in _INPUT_VALUED else self.y

    def rows(self, index: torch.Tensor) -> "SlotIO":
        """The same view restricted to some examples of the batch (per-example routing)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return replace(self, x=pick(self.x), y=pick(self.y), residual=pick(self.residual),
                       layers=tuple(pick(t) for t in self.layers), attention_mask=pick(self.attention_mask))

    def with_value(self, value: torch.Tensor) -> "SlotIO":
        """The view after an adapter rewrote the site's value (the next one in a ``Stack``)."""
        return replace(self, x=value) if self.place in _INPUT_VALUED else replace(self, y=value)


def _main_output(output):
    """The tensor a host outputs: itself, the first element of a tuple, or the first field of a
    ``ModelOutput`` (a mapping: ``last_hidden_state``)."""
    if isinstance(output, tuple):
        return output[0]
    if isinstance(output, Mapping):
        return next(iter(output.values()))
    return output


def _with_main_output(output, new: torch.Tensor):
    """``output`` with its main tensor replaced (a new tuple, or a copy of the ``ModelOutput``)."""
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, Mapping):
        fields = dict(output.items())
        fields[next(iter(fields))] = new
        return type(output)(**fields)
    return new


def _first_input(args: tuple, kwargs: dict) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The host's input: its first positional argument, else its first tensor keyword argument."""
    if args:
        return args[0], None
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, key
    return None, None


class Slot:
    """Runtime at one site: hooks installed only while a plan is active.

    Two plans, both compiled when the setup changes: ``plan`` for the active setup and ``routed``
    for per-example routing (``routing.routed_plan``); the hooks pick one per call from the
    forward context (``context.py``). Nothing per call is stored on the slot except, per thread,
    the residual captured between the pre-hook and the host's hook, so concurrent calls from
    several threads do not meet.

    Hooks are installed while the active setup has a plan here or while a routed call is under
    way (``arm_routing``, counted by the handle), so with no active setup and no routed call the
    model runs with no hook at all.
    """

    def __init__(self, site: Site):
        self.site = site
        self.plan: Optional[Plan] = None
        self.routed: Optional[Plan] = None
        self._routing_armed = False
        self._handles: list = []
        self._local = threading.local()

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a model: the thread-local stays behind
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def bind(self, units: dict[str, nn.Module], skip_layers: frozenset[int] = frozenset()) -> None:
        """The adapters' modules at this slot, in plan order, and the layers AdapterDrop skips,
        before each ``set_plans`` (slots whose site spans several blocks read them at call time)."""

    def set_plans(self, plan: Optional[Plan], routed: Optional[Plan] = None) -> None:
        """Set the plans and install or remove the hooks accordingly."""
        self.plan, self.routed = plan, routed
        self._sync_hooks()

    def arm_routing(self, armed: bool) -> None:
        """Keep the hooks installed for routed calls (``True``) or only for the active plan."""
        self._routing_armed = armed
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        wanted = self.plan is not None or (self._routing_armed and self.routed is not None)
        if not wanted:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            return
        if self._handles:
            return  # hooks already there; they read the plans at call time
        self._install()

    def _install(self) -> None:
        """Put this slot's hooks on the model (a place's own slot class may hook elsewhere)."""
        site = self.site
        if site.residual_from is not None:
            module, _ = site.residual_from
            self._handles.append(module.register_forward_pre_hook(self._capture, with_kwargs=True))
        for i, block in enumerate(site.layers_from):
            self._handles.append(block.register_forward_pre_hook(self._capture_layer(i, "layer_inputs")))
            self._handles.append(block.register_forward_hook(self._capture_layer(i, "layer_outputs")))
        if site.place == "pre":
            self._handles.append(site.host.register_forward_pre_hook(self._run_pre, with_kwargs=True))
            return
        # Weight-level adapters (LoRA, IA3) belong to the host's own computation, so they run
        # before sub-layer adapters that share the host (Llama's o_proj is both). A slot tapping
        # layers (L-adapter) reads them at the stack's inner length, so it runs before the input
        # place cuts its prompt positions off the host's output (places/input.py), whenever added.
        prepend = site.place == "weight" or bool(site.layers_from)
        self._handles.append(site.host.register_forward_hook(self._run, with_kwargs=True, prepend=prepend))

    def compile_routed(self, units, routed_plan: Callable):
        """The plan for per-example routing over ``units`` (name -> module) at this slot:
        ``routed_plan(units)`` (``composition.routing``, handed down by the handle)."""
        return routed_plan(units)

    def _current_plan(self) -> Optional[Plan]:
        ctx = context.current()
        return self.routed if ctx is not None and ctx.routing is not None else self.plan

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.residual = self.site.residual_from[1].pick(args, kwargs)

    def _capture_layer(self, index: int, kind: str):
        def capture(module: nn.Module, args: tuple, output=None) -> None:
            store = self._local.__dict__.setdefault(kind, {})
            if kind == "layer_inputs":
                store[index] = args[0] if args else None
            else:
                store[index] = output[0] if isinstance(output, tuple) else output
        return capture

    def _take_layers(self) -> tuple[torch.Tensor, ...]:
        """The block outputs of this forward, in order. A block that LayerDrop skipped passes
        its input on unchanged, so its output is the input of the next block that ran (or the
        last output before it)."""
        n = len(self.site.layers_from)
        outputs = self._local.__dict__.pop("layer_outputs", {})
        inputs = self._local.__dict__.pop("layer_inputs", {})
        if not n or not outputs:
            return ()
        taken: list[torch.Tensor] = []
        for i in range(n):
            if i in outputs:
                taken.append(outputs[i])
                continue
            later = next((inputs[j] for j in range(i + 1, n) if inputs.get(j) is not None), None)
            taken.append(later if later is not None else taken[-1])
        return tuple(taken)

    def _take_residual(self) -> Optional[torch.Tensor]:
        residual = getattr(self._local, "residual", None)
        self._local.residual = None
        return residual

    def _run(self, module: nn.Module, args: tuple, kwargs: dict, output):
        residual = self._take_residual()
        layers = self._take_layers()
        plan = self._current_plan()
        if plan is None:
            return None
        y = _main_output(output)
        x, _ = _first_input(args, kwargs)
        io = SlotIO(x=x, y=y, residual=residual, layer_norm=self.site.layer_norm, place=self.site.place,
                    layers=layers, attention_mask=_call_mask() if self.site.positions is not None else None)
        return _with_main_output(output, plan(io))

    def _run_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        residual = self._take_residual()
        plan = self._current_plan()
        if plan is None:
            return None
        x, key = _first_input(args, kwargs)
        if x is None:
            return None
        new_x = plan(SlotIO(x=x, y=None, residual=residual, layer_norm=self.site.layer_norm, place="pre"))
        if key is None:
            return (new_x, *args[1:]), kwargs
        return args, {**kwargs, key: new_x}


def _call_mask() -> Optional[torch.Tensor]:
    ctx = context.current()
    return None if ctx is None else ctx.attention_mask


def token_positions(mask: Optional[torch.Tensor], batch: int, length: int, first: int, last: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, min(first, T))`` and ``(B, min(last, T))`` sequence indices of each example's first
    and last real tokens: from the first position the mask keeps (left padding) to the last one,
    AdapterHub's rule (``offsets = mask.argmax(1)``, ``lengths = mask.sum(1)``); without a mask (or
    one of another length, e.g. with a prompt prepended) every position is real."""
    if mask is not None and mask.dim() == 2 and mask.shape == (batch, length):
        offsets, ends = mask.argmax(1).to(device), (mask.argmax(1) + (mask == 1).sum(1)).to(device)
    else:
        offsets = torch.zeros(batch, dtype=torch.long, device=device)
        ends = torch.full((batch,), length, dtype=torch.long, device=device)
    head = offsets[:, None] + torch.arange(min(first, length), device=device)  # (B, p)
    tail = ends[:, None] + torch.arange(-min(last, length), 0, device=device)  # (B, s)
    return head, tail


#: slot classes of places whose runtime is not a hook on the host (``register_slot``)
_SLOT_CLASSES: dict[str, type[Slot]] = {}


def register_slot(place: str, cls: type[Slot]) -> None:
    """Run the sites of ``place`` with ``cls`` instead of the hook-based ``Slot``."""
    _SLOT_CLASSES[place] = cls


def make_slot(site: Site) -> Slot:
    """The runtime for ``site``: its place's registered slot class, else ``Slot``."""
    return _SLOT_CLASSES.get(site.place, Slot)(site)
