"""The base class of every method config, and the method registry.

A method is one file in ``adapterkit/methods``: a frozen dataclass config that knows where its
modules go (``places``) and how to build one (``build``), registered with one decorator::

    @register_method("lora")
    @dataclass(frozen=True)
    class LoRAConfig(AdapterConfig): ...

Configs are immutable (``cfg.replace(r=16)`` gives a new one) and round-trip through JSON with
``to_dict`` / ``config_from_dict``. Named presets (``"pfeiffer"``, ``"houlsby"``, ...) are configs
registered under a name with ``register_preset``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

from torch import nn

from .errors import AdapterError
from .strategies import check_strategy, make_strategy
from .typecheck import check_field_types

if TYPE_CHECKING:  # pragma: no cover
    from .layouts import Layout
    from .places.slots import Site

_METHODS: dict[str, type["AdapterConfig"]] = {}
_PRESETS: dict[str, "AdapterConfig"] = {}


@dataclass(frozen=True)
class AdapterConfig:
    """Options every method shares: where to put the adapter.

    Args:
        target_modules: module-name patterns for the generic path (any ``nn.Module``): a regex
            string matched against full module names with ``re.fullmatch``, or a list of name
            suffixes. ``None`` uses the method's default places in the model's layout.
        layers: restrict placement to these layer indices (``None`` = all layers), counted
            within each stack.
        leave_out: layer indices that get no adapter (AdapterHub's ``leave_out``).
        stacks: the named stacks to place in (``("decoder",)`` on T5 / BART); ``None`` = all.
            ``add_adapter("decoder:name", ...)`` sets it (NeMo's module-scoped names).
        place: ``"post"``, ``"pre"``, ``"parallel"`` or ``"weight"`` (see ``slots.Site``);
            ``None`` = the method's own place.
        strategy: how the adapter's contribution meets what it is added to: ``"add"``
            (residual add), ``"scaled_add"`` (times ``strategy_scale``), ``"gate"`` /
            ``"channel_gate"`` (a learned scalar / per-channel gate) or ``"multiply"``;
            ``None`` = the method's own (``"multiply"`` for IA3, ``"add"`` otherwise).
        strategy_scale: the factor of ``"scaled_add"``.
        stochastic_depth: drop the adapter's contribution for whole examples with this
            probability while training, rescaling the kept ones by ``1 / (1 - p)`` (NeMo's
            ``stochastic_depth``; off at inference).
        l2_lambda: weight of an L2 penalty on the adapter's contribution while training
            (NeMo's ``l2_lambda``), returned as ``output.aux_loss`` and added to ``output.loss``.
        train_layer_norms: the adapter also trains its own copies of the layer norms
            (``LayerNorm`` / ``RMSNorm``) inside the layers it sits in, initialised from the
            base's, as Houlsby et al. train them; the base model's norms stay untouched
            (``methods/layer_norms.py``).
    """

    method: ClassVar[str] = ""
    #: whether ``merge_adapter`` can fold this method into the base weights
    supports_merge: ClassVar[bool] = False
    #: the places this method's modules can take (``slots.Site.place``); the first is the default
    places: ClassVar[tuple[str, ...]] = ("post", "pre", "parallel")
    #: the strategy used when ``strategy`` is ``None``
    default_strategy: ClassVar[str] = "add"
    #: whether ``Fuse`` can attend over this method's values at its slots
    supports_fusion: ClassVar[bool] = True
    #: the learning rate ``adapterkit train`` uses when ``--lr`` is not given (chosen on SST-2 dev
    #: with all-MiniLM-L6-v2; ``bench/accuracy.py``, docs/benchmarks.md)
    training_lr: ClassVar[float] = 2e-3

    target_modules: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    leave_out: tuple[int, ...] = ()
    stacks: tuple[str, ...] | None = None
    place: str | None = None
    strategy: str | None = None
    strategy_scale: float = 1.0
    stochastic_depth: float = 0.0
    l2_lambda: float = 0.0
    train_layer_norms: bool = False


    @classmethod
    def training_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Options ``adapterkit train --method <this method's name>`` adds where the user's
        ``options`` leave them out (chosen from measurements, like ``training_lr``; a preset name
        gets none); the default adds nothing."""
        return {}
    def __post_init__(self) -> None:
        # Lists from JSON or from users become tuples so that configs stay hashable and frozen.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif f.name in ("roles", "stacks") and isinstance(value, str):  # "q,v" or "all-linear"
                object.__setattr__(self, f.name, tuple(r.strip() for r in value.split(",") if r.strip()))
        try:
            check_field_types(self)  # e.g. layers="all", non_linearity=3: refused here, by name
            self._validate_shared()
            self.validate()
        except TypeError as err:  # a value of the wrong type, e.g. reduction_factor="16"
            given = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                              if getattr(self, f.name) != f.default)
            raise AdapterError(
                f"Invalid option value for method '{self.method}' ({err}); options given: {given or 'none'}. "
                "Check their types (numbers, booleans, strings) against the method's documentation."
            ) from None

    def _validate_shared(self) -> None:
        if self.place is not None and self.place not in self.places:
            raise AdapterError(
                f"Method '{self.method}' cannot take place='{self.place}'; its places: {', '.join(self.places)}."
            )
        if self.strategy is not None:
            check_strategy(self.strategy)  # the built-ins and the registered ones (strategies.register_strategy)
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise AdapterError(f"stochastic_depth must be in [0, 1), got {self.stochastic_depth}.")
        if not self.l2_lambda >= 0.0:
            raise AdapterError(f"l2_lambda must be >= 0, got {self.l2_lambda}.")
        if self.stacks is not None and not all(isinstance(s, str) and s for s in self.stacks):
            raise AdapterError(f"stacks must be stack names such as 'encoder' or 'decoder', got {self.stacks!r}.")

    # -- to be provided by each method -------------------------------------------------------
    def validate(self) -> None:
        """Raise ``AdapterError`` when options do not make sense on their own."""

    def sites(self, layout: "Layout") -> list["Site"]:
        """The sites (host modules) this adapter occupies in a model with this layout."""
        raise NotImplementedError

    def build(self, site: "Site") -> nn.Module:
        """A fresh adapter module (an ``AdapterModule``) for one site, initialised so that its
        contribution leaves the output unchanged."""
        raise NotImplementedError

    def for_loading(self) -> "AdapterConfig":
        """The config to build modules whose weights a checkpoint then replaces: a method whose
        initialisation needs more than the model (a tokenizer) returns one that skips it."""
        return self

    def as_saved(self) -> "AdapterConfig":
        """The config ``save_adapter`` writes, describing the saved tensors (``AdapterModule.saved_state``):
        this config, except for methods that save a folded form (prefix tuning: ``flat=True``)."""
        return self

    def default_place(self) -> str:
        """The place used when ``place`` is ``None``."""
        return self.places[0]

    # -- shared ------------------------------------------------------------------------------
    @property
    def resolved_place(self) -> str:
        return self.place or self.default_place()

    @property
    def resolved_strategy(self) -> str:
        return self.strategy or self.default_strategy

    @property
    def merges_exactly(self) -> bool:
        """Whether ``merge_adapter`` can fold this adapter into the weights: a mergeable method
        combined by its own strategy, with nothing random or learned around it."""
        return self.merge_refusal() is None

    def merge_refusal(self) -> Optional[str]:
        """Why ``merge_adapter`` cannot fold this adapter into the weights, or ``None`` (a method
        adds its own reasons, e.g. LoRA's ``use_gating``)."""
        if not self.supports_merge:
            return "only methods that change weights can (lora, ia3)"
        if self.strategy not in (None, self.default_strategy):
            return f"its strategy '{self.strategy}' is not the method's own ('{self.default_strategy}')"
        return None

    def placed_sites(self, layout: "Layout") -> list["Site"]:
        """``sites(layout)``, each as this adapter meets it (``Site.at(place_for(site))``), then
        the layer norms of the layers they cover where ``train_layer_norms`` is set."""
        sites = [site.at(self.place_for(site)) for site in self.sites(layout)]
        for feature in _FEATURES:
            sites += [s for s in feature.extra_sites(self, layout, sites) if s.place_id not in {t.place_id for t in sites}]
        return sites

    def place_for(self, site: "Site") -> str:
        """The place of the module at ``site`` (one place for all sites unless a method says otherwise)."""
        return self.resolved_place

    def build_unit(self, site: "Site") -> nn.Module:
        """``build(site)`` with its strategy attached: what the core places at a site."""
        for feature in _FEATURES:  # a feature's own site, e.g. train_layer_norms' copy of a norm
            unit = feature.build(site)
            if unit is not None:
                return unit
        module = self.build(site)
        if not (isinstance(module, nn.Module) and all(callable(getattr(module, h, None)) for h in _UNIT_HOOKS)):
            raise AdapterError(
                f"Method '{self.method}' built a {type(module).__name__}; a method's build() must return an "
                "adapterkit.methods.base.AdapterModule (see methods/ia3.py for a short example)."
            )
        width = site.in_features if site.place == "pre" else site.out_features
        strategy = make_strategy(self.resolved_strategy, width, scale=self.strategy_scale,
                                 stochastic_depth=self.stochastic_depth, l2_lambda=self.l2_lambda)
        if strategy.makes_identity:
            module.init_nonzero()
        module.strategy = strategy
        return module

    def build_units(self, sites: Sequence["Site"]) -> nn.ModuleDict:
        """``build_unit`` for every site, keyed by ``Site.key``; modules reading a layer norm of
        which the adapter holds a copy read through it (``train_layer_norms``)."""
        modules = nn.ModuleDict()
        for site in sites:
            if site.key in modules:
                raise AdapterError(f"Place '{site.place_id}' was selected twice; check target_modules / layers.")
            modules[site.key] = self.build_unit(site)
        for feature in _FEATURES:
            feature.link(sites, modules)
        return modules

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with some options changed (the config itself is immutable)."""
        _check_option_names(type(self), changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the method name and every option."""
        out: dict[str, Any] = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_option_names(cls: type[AdapterConfig], options: Mapping[str, Any]) -> None:
    valid = {f.name for f in fields(cls)}
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise AdapterError(
                f"Unknown option '{key}' for method '{cls.method}'.{hint} "
                f"Valid options: {', '.join(sorted(valid))}."
            )


#: what the core calls on every unit a method builds (``methods/base.py``'s ``AdapterModule`` has them all)
_UNIT_HOOKS = ("read", "run", "saved_state", "init_nonzero", "stack_key")


class Feature:
    """Something any method can have, plugged in from its own module by ``register_feature``
    (``train_layer_norms``: ``methods/layer_norms.py``); the base calls these hooks and knows no
    feature by name."""

    def extra_sites(self, config: AdapterConfig, layout: "Layout", sites: Sequence["Site"]) -> list["Site"]:
        """More sites for an adapter of ``config`` already placed at ``sites``."""
        return []

    def build(self, site: "Site") -> Optional[nn.Module]:
        """The unit for one of this feature's own sites; ``None`` for any other site."""
        return None

    def link(self, sites: Sequence["Site"], units: Mapping[str, nn.Module]) -> None:
        """Connect an adapter's units once all are built."""


_FEATURES: list[Feature] = []
#: name forms beyond presets and methods: name -> config, or None when the form is not theirs
_NAME_FORMS: list[Callable[[str], Optional[AdapterConfig]]] = []


def register_feature(feature: Feature) -> Feature:
    """Plug a ``Feature`` into every method (once per feature)."""
    if feature not in _FEATURES:
        _FEATURES.append(feature)
    return feature


def register_name_form(resolve: Callable[[str], Optional[AdapterConfig]]) -> Callable[[str], Optional[AdapterConfig]]:
    """Let ``resolve_config`` understand more names (``"a+b"`` unions: ``methods/union.py``)."""
    if resolve not in _NAME_FORMS:
        _NAME_FORMS.append(resolve)
    return resolve


def _from_name(key: str) -> Optional[AdapterConfig]:
    return next((cfg for cfg in (form(key) for form in _NAME_FORMS) if cfg is not None), None)


def register_method(name: str):
    """Class decorator: make a config class available under ``name`` (one line per method)."""

    def decorate(cls: type[AdapterConfig]) -> type[AdapterConfig]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise AdapterError(f"A method named '{name}' is already registered; pick another name.")
        cls.method = name
        _METHODS[name] = cls
        return cls

    return decorate


def register_preset(name: str, config: AdapterConfig) -> None:
    """Register a named configuration, e.g. ``register_preset("pfeiffer", BottleneckConfig(...))``."""
    _PRESETS[name.lower()] = config


def available_methods() -> list[str]:
    return sorted(_METHODS)


def available_presets() -> list[str]:
    return sorted(_PRESETS)


def _unknown(kind: str, name: str, choices: Sequence[str]) -> AdapterError:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return AdapterError(f"Unknown {kind} '{name}'.{hint} Choose one of: {', '.join(choices)}.")


def resolve_config(config: "str | AdapterConfig | Mapping[str, Any]", **overrides: Any) -> AdapterConfig:
    """Turn a preset name, a method name, a dict or a config into a config, applying overrides.

    >>> resolve_config("pfeiffer", reduction_factor=8).reduction_factor
    8
    """
    if isinstance(config, AdapterConfig):
        cfg = config
    elif isinstance(config, str):
        key = config.lower()
        if key in _PRESETS:
            cfg = _PRESETS[key]
        elif key in _METHODS:
            cfg = _METHODS[key]()
        elif (named := _from_name(key)) is not None:  # a registered name form: "e_adapter+l_adapter" (methods/union.py)
            cfg = named
        else:
            raise _unknown("method or preset", config, sorted(set(_PRESETS) | set(_METHODS)))
    elif isinstance(config, Mapping):
        return config_from_dict({**config, **overrides})
    else:
        raise AdapterError(
            f"An adapter config must be a preset name, a method name, a dict or an AdapterConfig, "
            f"not {type(config).__name__}."
        )
    return cfg.replace(**overrides) if overrides else cfg


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict()`` output (for example from ``adapter_config.json``)."""
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise AdapterError("The adapter config has no 'method' key; add one, e.g. \"method\": \"bottleneck\".")
    if method not in _METHODS:
        raise _unknown("method", str(method), sorted(_METHODS))
    cls = _METHODS[method]
    _check_option_names(cls, data)
    try:
        return cls(**data)
    except TypeError as err:  # wrong types reach dataclass __init__ as TypeError
        raise AdapterError(f"Invalid options for method '{method}': {err}") from None
