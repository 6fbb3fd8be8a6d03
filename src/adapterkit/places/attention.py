"""The ``attention`` place: key / value prefixes inside ``transformers``' attention (prefix tuning).

``transformers`` 5.x models call their attention through ``AttentionInterface``
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``) as ``f(module, query, key, value,
attention_mask, **kwargs)``, with key and value already rotated (rotary models), already read
from and written to the KV cache, shaped ``(B, H_kv, T, d)``. For each implementation it wraps
(``sdpa``, ``eager``) this module registers one more, ``adapterkit_prefix_<name>``, which

1. asks the ``AttentionSlot`` of the calling module (if it has one with a plan) for this layer's
   prefix keys and values and each example's weight on them (``AttentionSlot.prefix``);
2. prepends them to key and value: after the cache update, so they are never written into the
   cache, and after the rotary embedding, so they carry no position (as PEFT's prefixes, which
   enter as ``past_key_values``); with ``H_kv`` heads, so grouped-query attention repeats them
   with the keys;
3. extends the attention mask with one column per prefix position (building the explicit mask
   that sdpa would have replaced by ``is_causal``) and T5's relative position bias with zeros
   (prefix columns get no bias);
4. calls the original implementation with everything else unchanged.

An ``AttentionSlot`` switches the ``config`` of its attention modules to the wrapping
implementation while it has a plan (an active setup, or a routed call under way) and back when
no slot on that config has one, so with prefix tuning off the model runs exactly its own code.
The mask interface gets the original's mask function under the new name, so the model builds
the masks it always builds.

**Composition.** A slot's value (what plans compute, ``SlotIO.y``) is a ``(B, n)`` tensor: for
each example, how many times each of the slot's ``n`` adapters' prefixes is present (0: absent).
A prefix tuning module adds one to its own column (``PrefixTuning.forward``), so ``Stack``
concatenates prefixes, ``BatchSplit`` and per-example routing choose them per row, ``Average``
weighs them, with the existing plans. A weight ``m`` becomes ``log m`` on the prefix's mask
columns, which is exactly the attention ``m`` copies of those keys and values would get; rows
with weight 0 (no prefix, or another adapter's) mask the columns out, so they compute what the
bare model computes. Attention does not depend on the order of its key columns, so prefixes are
laid out in the slot's adapter order whatever the setup's order.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..errors import AdapterError
from .probe import probe_forward
from .slots import Site, Slot, SlotIO, register_slot

#: the implementations prefix tuning wraps, and the prefix of the wrapping ones' names
WRAPPED = ("sdpa", "eager")
PREFIX = "adapterkit_prefix_"

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, tuple[AttentionSlot, int]]" = weakref.WeakKeyDictionary()
_SWITCHED: dict[int, list] = {}  # id(config) -> [config, original implementation, slots using it]
_LOCK = threading.Lock()
_SEEN: contextvars.ContextVar[Optional[set]] = contextvars.ContextVar("adapterkit_attention_seen", default=None)
_CAPTURE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("adapterkit_attention_capture", default=None)


@dataclass(frozen=True)
class Prefix:
    """One layer's prefixes: ``keys`` / ``values`` ``(P, H_kv * d)``, and ``weights`` ``(B, P)``
    (each example's weight on each prefix position), ``None`` when every weight is one."""

    keys: torch.Tensor
    values: torch.Tensor
    weights: Optional[torch.Tensor]
    #: ``(2, B, P)``: each example's factor on each prefix key / value position (gated prefixes,
    #: AdapterHub's ``use_gating``), ``None`` when ungated
    scales: Optional[torch.Tensor] = None


def _original(name: str, module: nn.Module) -> Callable:
    """The implementation ``name`` as ``module`` would call it (``eager``: its model file's own)."""
    if name != "eager":
        return ALL_ATTENTION_FUNCTIONS[name]
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise AdapterError(f"{type(module).__name__}'s model file has no eager_attention_forward; load the model with "
                           "attn_implementation='sdpa' to use prefix tuning.")
    return function


def _wrapping(name: str) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], **kwargs: Any):
        seen = _SEEN.get()
        if seen is not None:
            seen.add(module)
        captured = _CAPTURE.get()
        if captured is not None:  # capturing(): the model's own keys and values, (B, H_kv, T, d)
            captured[module] = (key.detach(), value.detach())
        owner = _OWNERS.get(module)
        prefix = owner[0].prefix(owner[1], query.shape[0]) if owner is not None else None
        if prefix is not None:
            key, value, attention_mask, kwargs = _prepend(prefix, module, query, key, value, attention_mask, kwargs,
                                                          sdpa=name == "sdpa")
        return _original(name, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{name}"
    return attention


def _register() -> None:
    for name in WRAPPED:
        AttentionInterface.register(PREFIX + name, _wrapping(name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + name, ALL_MASK_ATTENTION_FUNCTIONS[name])


def _explicit_mask(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   kwargs: dict, sdpa: bool):
    """The mask the original implementation applies when it gets none: sdpa's ``is_causal``
    (a causal mask; keys cropped to the queries as sdpa crops them), else every key."""
    q_len, k_len = query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    causal = sdpa and bool(causal) and q_len > 1
    bias = kwargs.get("position_bias")
    if causal and k_len > q_len:  # sdpa's own crop (prefill into an empty static cache)
        key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        if bias is not None:
            kwargs = {**kwargs, "position_bias": bias[..., :q_len]}
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    return (mask.tril() if causal else mask).view(1, 1, q_len, k_len), key, value, kwargs


def _prepend(prefix: Prefix, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             mask: Optional[torch.Tensor], kwargs: dict, sdpa: bool):
    """``key``, ``value``, ``mask`` and ``kwargs`` with the prefix in front (module docstring)."""
    batch, heads, _, dim = key.shape
    positions, width = prefix.keys.shape
    if width != heads * dim:
        raise AdapterError(
            f"The prefix has width {width} per position, but {type(module).__name__} attends with {heads} key/value "
            f"heads of width {dim} ({heads * dim}); the adapter was built for another attention shape. Add it afresh "
            "on this model."
        )
    if mask is None:
        mask, key, value, kwargs = _explicit_mask(module, query, key, value, kwargs, sdpa)
    as_heads = lambda t: t.view(positions, heads, dim).transpose(0, 1).to(key.dtype)  # noqa: E731  (H_kv, P, d)
    keys, values = as_heads(prefix.keys).expand(batch, -1, -1, -1), as_heads(prefix.values).expand(batch, -1, -1, -1)
    if prefix.scales is not None:  # gated: (B, P) factors per example and position
        scales = prefix.scales.to(key.dtype)
        keys, values = keys * scales[0][:, None, :, None], values * scales[1][:, None, :, None]
    key = torch.cat([keys, key], dim=2)
    value = torch.cat([values, value], dim=2)
    rows, mask_heads, q_len, _ = mask.shape
    weights = prefix.weights
    if weights is None:
        columns = mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())
        columns = columns.expand(rows, mask_heads, q_len, positions)
    else:
        rows = batch
        lowest = torch.finfo(query.dtype).min
        if mask.dtype == torch.bool and bool(((weights == 0) | (weights == 1)).all()):
            columns = weights > 0
        else:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, lowest)
            columns = torch.where(weights > 0, weights.clamp_min(1e-30).log(), lowest).to(mask.dtype)
        columns = columns[:, None, None, :].expand(batch, mask_heads, q_len, positions)
    mask = torch.cat([columns, mask.expand(rows, -1, -1, -1)], dim=-1)
    bias = kwargs.get("position_bias")
    if bias is not None:  # T5: prefix columns get no relative position bias
        kwargs = {**kwargs, "position_bias": torch.cat([bias.new_zeros(*bias.shape[:-1], positions), bias], dim=-1)}
    return key, value, mask, kwargs


def _switch(config: Any, on: bool) -> None:
    """Count one more (or one fewer) active slot on ``config``; the first switches its attention
    to the wrapping implementation, the last switches it back (caller holds ``_LOCK``)."""
    entry = _SWITCHED.get(id(config))
    if on:
        if entry is None:
            original = config._attn_implementation.removeprefix(PREFIX)  # a copy of a switched config
            entry = _SWITCHED[id(config)] = [config, original, 0]
            config._attn_implementation_internal = PREFIX + original  # this config only, not its sub-configs
        entry[2] += 1
        return
    entry[2] -= 1
    if entry[2] == 0:
        config._attn_implementation_internal = entry[1]
        del _SWITCHED[id(config)]


@contextlib.contextmanager
def capturing(members: Sequence[nn.Module]) -> Iterator[dict]:
    """While the block runs, record the key and value states ``(B, H_kv, T, d)`` (after the rotary
    embedding) each of ``members`` attends with: ``{module: (key, value)}`` (prefix tuning's
    initialisation from a text)."""
    found: dict = {}
    token = _CAPTURE.set(found)
    configs = _configs(members)
    with _LOCK:
        for config in configs:
            _switch(config, True)
    try:
        yield found
    finally:
        with _LOCK:
            for config in configs:
                _switch(config, False)
        _CAPTURE.reset(token)


def _configs(members: Sequence[nn.Module]) -> list[Any]:
    return list({id(m.config): m.config for m in members}.values())


def _implementation(config: Any) -> str:
    """The implementation ``config`` uses on its own (unwrapped while a slot has switched it)."""
    entry = _SWITCHED.get(id(config))
    return entry[1] if entry is not None else config._attn_implementation


class AttentionSlot(Slot):
    """The runtime of one ``attention`` site: no hooks; while it has a plan its attention
    modules are registered as its members and their config runs the wrapping implementation."""

    def __init__(self, site: Site):
        super().__init__(site)
        self.units: list[nn.Module] = []
        self.skipped: frozenset[int] = frozenset()  # AdapterDrop's skip_layers (active setup only)
        self._installed = False
        self._gated = False  # a gated prefix among the units (bind)

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy of a model: register the copy's modules
        super().__setstate__(state)
        if self._installed:
            self._installed = False
            self._sync_hooks()

    def bind(self, units: dict[str, nn.Module], skip_layers: frozenset[int] = frozenset()) -> None:
        self.units, self.skipped = list(units.values()), skip_layers
        for column, unit in enumerate(self.units):
            unit.column = column
        # whether a gated prefix is bound: computed here, once per setup change, not per call
        self._gated = any(getattr(u, "gates", None) is not None for u in self.units)
        self._sync_input_hooks()

    def _sync_hooks(self) -> None:
        wanted = self.plan is not None or (self._routing_armed and self.routed is not None)
        if wanted == self._installed:
            return
        members = self.site.members
        with _LOCK:
            for layer, module in enumerate(members):
                if wanted:
                    _OWNERS[module] = (self, layer)
                else:
                    _OWNERS.pop(module, None)
            for config in _configs(members):
                _switch(config, wanted)
        self._installed = wanted
        self._sync_input_hooks()

    def _sync_input_hooks(self) -> None:
        """Gated prefixes read their attention's input (``hidden_states``): while the slot is
        installed and holds a gated unit, a pre-hook on every member keeps it for the call."""
        wanted = self._installed and self._gated
        if wanted == bool(self._handles):
            return
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if wanted:
            self._handles.extend(m.register_forward_pre_hook(self._keep_input, with_kwargs=True)
                                 for m in self.site.members)

    def _keep_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._local.__dict__.setdefault("inputs", {})[module] = args[0] if args else kwargs.get("hidden_states")

    def prefix(self, layer: int, batch: int) -> Optional[Prefix]:
        """Layer ``layer``'s prefixes for a batch of ``batch`` examples under the current plan,
        or ``None`` when no example has one."""
        inputs = self._local.__dict__.get("inputs")
        hidden = inputs.pop(self.site.members[layer], None) if inputs else None  # gated prefixes' input
        plan = self._current_plan()
        if plan is None or not self.units or (plan is self.plan and layer in self.skipped):
            return None  # (per-example routing ignores skip_layers, as elsewhere)
        ref = next(self.units[0].parameters())
        counts = plan(SlotIO(x=None, y=torch.zeros(batch, len(self.units), device=ref.device), place="attention"))
        # the columns some example uses, found in one tensor operation: the Python work that follows
        # grows with the adapters the batch uses, not with the number at the slot
        columns = counts.ne(0).any(0).nonzero().flatten().tolist()
        used = [(self.units[c], counts[:, c]) for c in columns if self.units[c].covers(layer)]
        if not used:
            return None
        kv = [unit.prefix_at(layer) for unit, _ in used]  # each (2, P_u, H_kv * d)
        weights = None
        if not all(bool(weight.eq(1).all()) for _, weight in used):
            weights = torch.cat([w[:, None].expand(-1, t.shape[1]) for (_, w), t in zip(used, kv)], dim=1)
        both = torch.cat(kv, dim=1) if len(kv) > 1 else kv[0]
        return Prefix(both[0], both[1], weights, _scales(layer, batch, used, kv, hidden))


def _scales(layer: int, batch: int, used: list, kv: list, hidden: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(2, B, P)``: the gated prefixes' factors (``PrefixTuning.gate_at`` of the attention's
    input ``hidden``), one elsewhere; ``None`` when no prefix is gated."""
    gates = [getattr(unit, "gate_at", lambda *_: None)(layer, hidden) for unit, _ in used]
    if all(g is None for g in gates):
        return None
    ones = kv[0].new_ones(batch, 2)
    return torch.cat([(ones if g is None else g.to(ones.dtype)).T[:, :, None].expand(-1, -1, t.shape[1])
                      for g, t in zip(gates, kv)], dim=2)  # (2, B, P)


def _members_text(layout: Any, modules: Sequence[nn.Module]) -> str:
    names = {m: n for n, m in layout.model.named_modules()}
    shown = [names.get(m, type(m).__name__) for m in modules[:3]]
    return ", ".join(shown) + (" ..." if len(modules) > 3 else "")


_PROBED: "weakref.WeakKeyDictionary[Any, Optional[set]]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _recording() -> Iterator[set]:
    seen: set = set()
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


def _modules_calling_the_interface(layout: Any, members: Sequence[nn.Module]) -> Optional[set]:
    """The attention modules that call the attention interface in one probe forward (``None``:
    the model could not be probed); kept per layout."""
    if layout not in _PROBED:
        configs = _configs(members)
        with _LOCK:
            for config in configs:
                _switch(config, True)
        try:
            with _recording() as seen:
                failed = probe_forward(layout.model)
        finally:
            with _LOCK:
                for config in configs:
                    _switch(config, False)
        _PROBED[layout] = None if failed else seen
    return _PROBED[layout]


def check_attention(layout: Any, sites: Sequence[Site]) -> None:
    """Refuse attention sites whose modules do not run their attention through
    ``transformers``' attention interface with an implementation prefix tuning wraps."""
    members = [m for site in sites for m in site.members]
    model = f"this {layout.model_type} model ({layout.spec.name} layout)"
    outside = [m for m in members if not isinstance(getattr(getattr(m, "config", None), "_attn_implementation", None),
                                                    str)]
    if not outside:
        used = sorted({_implementation(c) for c in _configs(members)})
        other = [name for name in used if name not in WRAPPED]
        if other:
            raise AdapterError(
                f"Prefix tuning wraps the 'sdpa' and 'eager' attention implementations, but {model} uses {other}. "
                "Load the model with attn_implementation='sdpa' (or 'eager')."
            )
        seen = _modules_calling_the_interface(layout, members)
        outside = [] if seen is None else [m for m in members if m not in seen]
    if outside:
        raise AdapterError(
            f"The attention of {model} does not go through transformers' AttentionInterface "
            f"({_members_text(layout, outside)}), so prefix tuning cannot add keys and values to it. "
            "Use LoRA, IA3 or a bottleneck adapter on this model, or a model whose attention calls "
            "ALL_ATTENTION_FUNCTIONS (transformers 5.x BERT, GPT-2, Llama, T5, BART, ...)."
        )


_register()
register_slot("attention", AttentionSlot)
