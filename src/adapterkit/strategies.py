"""Strategies: how an adapter's contribution meets what it is combined with (NeMo's
``adapter_strategy``), with NeMo's regularisers available to every method.

A strategy receives the adapter module and what its site offers, and returns the new value:

==============  ===========================================  ================================
name            result                                       identity at init
==============  ===========================================  ================================
``add``         ``base + delta``                             the method's own (delta 0)
``scaled_add``  ``base + scale * delta``                     the method's own
``gate``        ``base + g * delta``, ``g`` a learned scalar  ``g = 0`` (the module is
``channel_gate`` the same with one ``g`` per channel            initialised non-zero instead)
``multiply``    ``base * factor``                            the method's own (factor 1)
==============  ===========================================  ================================

A module's contribution is a *delta* or a *factor* (``AdapterModule.output``); each strategy
turns it into the form it needs (a factor ``f`` is the delta ``base * (f - 1)``, a delta ``d``
the factor ``1 + d``), so every strategy works with every method.

``stochastic_depth`` (training only) keeps each example's change ``out - base`` with
probability ``1 - p`` and rescales kept ones by ``1 / (1 - p)``, per example (NeMo's
``ResidualAddAdapterStrategy`` draws one mask for the whole batch). ``l2_lambda`` adds
``l2_lambda * mean over examples of sum((out - base)^2)`` (NeMo's formula) to the forward
context's auxiliary losses while training an adapter with trainable parameters.

Strategies are open, as NeMo's are: a user subclasses ``Strategy`` (defining ``delta``, and
``makes_identity`` / ``fusion_scale`` / ``create`` where needed) and registers it by name with
``@register_strategy("name")``; ``add_adapter(..., strategy="name")`` then uses it, and the name
is what the adapter's config saves. Loading such an adapter needs the class registered first
(the import that registers it), as NeMo needs the strategy's class on its path; an unknown name is
refused with the list of registered ones. The built-ins are registered the same way.

With neither at work, ``add`` and ``scaled_add`` take the module's fused shortcuts
(``methods/fused.py``): the up-projection accumulates into the base in one GEMM, and at inference
a Pfeiffer-shaped adapter folds the model's layer norm into its down-projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn

from . import context
from .errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import AdapterModule
    from .places.slots import SlotIO


def as_delta(base: torch.Tensor, c: torch.Tensor, output: str) -> torch.Tensor:
    return c if output == "delta" else base * (c - 1)


def as_factor(c: torch.Tensor, output: str) -> torch.Tensor:
    return c if output == "factor" else 1 + c


class Strategy(nn.Module):
    """Base class: regularisers and the shared control flow; subclasses say how to combine."""

    #: a fresh adapter is the identity through the strategy itself (a zero gate)
    makes_identity: ClassVar[bool] = False
    #: without regularisers an instance holds no state (no parameters, buffers or training
    #: behaviour), so every unit with the same options shares one (``make_strategy``); a class
    #: says so itself (a subclass, which may add state, does not inherit it)
    stateless: ClassVar[bool] = False

    def __init__(self, stochastic_depth: float = 0.0, l2_lambda: float = 0.0):
        super().__init__()
        self.stochastic_depth = float(stochastic_depth)
        self.l2_lambda = float(l2_lambda)

    @classmethod
    def create(cls, width: int, scale: float, **regularisers: float) -> "Strategy":
        """The strategy for a site whose combined value has ``width`` channels (``scale``: the
        config's ``strategy_scale``); a subclass whose constructor takes more overrides this."""
        return cls(**regularisers)

    # -- what subclasses define ------------------------------------------------------------------
    def fusion_scale(self) -> Optional[float]:
        """The factor of a plain add, for the modules' fused shortcuts; ``None``: no shortcut."""
        return None

    def delta(self, base: torch.Tensor, c: torch.Tensor, output: str) -> torch.Tensor:
        """The change ``out - base`` this strategy makes of contribution ``c``."""
        raise NotImplementedError  # pragma: no cover

    def combine(self, base: torch.Tensor, c: torch.Tensor, output: str) -> torch.Tensor:
        return base + self.delta(base, c, output)

    # -- shared ----------------------------------------------------------------------------------
    def _regularising(self) -> bool:
        return self.training and (self.stochastic_depth > 0.0 or (self.l2_lambda > 0.0 and torch.is_grad_enabled()))

    def forward(self, unit: "AdapterModule", io: "SlotIO") -> torch.Tensor:
        if not self._regularising():
            scale = self.fusion_scale()
            if scale is not None:
                out = unit.fused_site(io, scale)
                if out is not None:
                    return out
            h, base = unit.read(io)
            if scale is not None:
                out = unit.add_to(base, h, scale)
                if out is not None:
                    return out
            return self.combine(base, unit(h, base), unit.output)
        h, base = unit.read(io)
        change = self.delta(base, unit(h, base), unit.output)
        p = self.stochastic_depth
        if p > 0.0:
            keep = change.new_empty((change.shape[0],) + (1,) * (change.dim() - 1)).bernoulli_(1.0 - p)
            change = change * keep.div_(1.0 - p)
        if self.l2_lambda > 0.0 and torch.is_grad_enabled() and any(q.requires_grad for q in unit.parameters()):
            context.add_aux_loss(self.l2_lambda * change.square().reshape(change.shape[0], -1).sum(-1).mean())
        return base + change

    def extra_repr(self) -> str:
        return f"stochastic_depth={self.stochastic_depth}, l2_lambda={self.l2_lambda}"


_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str):
    """Class decorator: make a ``Strategy`` subclass available as ``strategy=name``."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise AdapterError(f"register_strategy('{name}') needs a subclass of adapterkit.strategies.Strategy, "
                               f"got {cls!r}.")
        if not isinstance(name, str) or not name.isidentifier():
            raise AdapterError(f"A strategy name must be a Python identifier such as 'soft_gate', got {name!r}.")
        known = _STRATEGIES.get(name)
        same = known is not None and (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__)
        if known is not None and known is not cls and not same:  # same: the definition run again (a notebook)
            raise AdapterError(f"A strategy named '{name}' is already registered; pick another name.")
        _STRATEGIES[name] = cls
        return cls

    return decorate


def available_strategies() -> tuple[str, ...]:
    """The registered strategy names, built-ins first."""
    return tuple(_STRATEGIES)


def check_strategy(name: str) -> None:
    """Refuse a strategy name nobody registered."""
    if name not in _STRATEGIES:
        raise AdapterError(f"Unknown strategy '{name}'; choose one of: {', '.join(_STRATEGIES)} (a strategy of your "
                           "own must be registered with adapterkit.register_strategy before the adapter is added or "
                           "loaded).")


@register_strategy("add")
class Add(Strategy):
    """``base + delta``: NeMo's residual add."""

    stateless = True

    def fusion_scale(self) -> Optional[float]:
        return 1.0

    def delta(self, base, c, output):
        return as_delta(base, c, output)


@register_strategy("scaled_add")
class ScaledAdd(Strategy):
    """``base + scale * delta`` with a fixed ``scale``."""

    stateless = True

    def __init__(self, scale: float, **regularisers: float):
        super().__init__(**regularisers)
        self.scale = float(scale)

    @classmethod
    def create(cls, width: int, scale: float, **regularisers: float) -> Strategy:
        return cls(scale, **regularisers)

    def fusion_scale(self) -> Optional[float]:
        return self.scale

    def delta(self, base, c, output):
        return as_delta(base, c, output) * self.scale


class Gate(Strategy):
    """``base + gate * delta``; the gate (a scalar, or one value per channel) starts at zero."""

    makes_identity = True

    def __init__(self, width: int, **regularisers: float):
        super().__init__(**regularisers)
        self.gate = nn.Parameter(torch.zeros(width))

    def delta(self, base, c, output):
        return as_delta(base, c, output) * self.gate


@register_strategy("gate")
class ScalarGate(Gate):
    """``Gate`` with one learned scalar."""

    @classmethod
    def create(cls, width: int, scale: float, **regularisers: float) -> Strategy:
        return cls(1, **regularisers)


@register_strategy("channel_gate")
class ChannelGate(Gate):
    """``Gate`` with one learned value per channel."""

    @classmethod
    def create(cls, width: int, scale: float, **regularisers: float) -> Strategy:
        return cls(width, **regularisers)


@register_strategy("multiply")
class Multiply(Strategy):
    """``base * factor``: IA3's rescaling."""

    stateless = True

    def delta(self, base, c, output):
        return base * (as_factor(c, output) - 1)

    def combine(self, base, c, output):
        return base * as_factor(c, output)


#: the built-in strategies (``available_strategies()`` adds the registered ones)
STRATEGIES = ("add", "scaled_add", "gate", "channel_gate", "multiply")


def make_strategy(name: str, width: int, *, scale: float = 1.0, stochastic_depth: float = 0.0,
                  l2_lambda: float = 0.0) -> Strategy:
    """The strategy called ``name`` for a site whose combined value has ``width`` channels. A
    ``stateless`` one without regularisers is one shared instance per (class, scale): a module
    per unit would cost about 2 KB each with thousands of adapters loaded (docs/design.md)."""
    check_strategy(name)
    cls = _STRATEGIES[name]
    if cls.__dict__.get("stateless", False) and not stochastic_depth and not l2_lambda:
        key = (cls, float(scale))
        if key not in _SHARED:
            _SHARED[key] = cls.create(width, scale)
        return _SHARED[key]
    return cls.create(width, scale, stochastic_depth=stochastic_depth, l2_lambda=l2_lambda)


#: the shared instances of stateless strategies, by (class, scale)
_SHARED: dict[tuple[type, float], Strategy] = {}
