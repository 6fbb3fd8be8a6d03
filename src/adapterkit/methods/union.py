"""Several methods trained, saved and routed as one adapter (AdapterHub's ``ConfigUnion``).

``add_adapter("a", "e_adapter+l_adapter")`` (or ``ConfigUnion(parts=("e_adapter", "l_adapter"))``)
places every part's modules under the one adapter ``a``: each site is built by the part that
chose it, with that part's own strategy, so nothing about a method changes inside a union. Two
parts that choose the same site are refused (they would be one module per site). The options
every method shares (``layers``, ``stacks``, ``strategy``, ...) given to the union apply to every
part; a method option (``reduction_factor=8``) goes to the parts that have it.

ELP-adapter tuning is ``"e_adapter+l_adapter"`` (and ``+p_adapter`` once the prompt method
exists): E-adapters in every encoder layer and an L-adapter from every layer to the head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ..config import (AdapterConfig, _check_option_names, config_from_dict, register_method, register_name_form,
                      resolve_config)
from ..errors import AdapterError
from ..places.slots import Site

_SHARED = {f.name for f in fields(AdapterConfig)}


def _resolve(part: Any) -> AdapterConfig:
    if isinstance(part, dict):
        return config_from_dict(part)
    return resolve_config(part)


@register_method("union")
@dataclass(frozen=True)
class ConfigUnion(AdapterConfig):
    """Several methods as one adapter.

    Args:
        parts: the methods: preset or method names, dicts (``to_dict()`` output) or configs.
    """

    parts: tuple[Any, ...] = ()

    def validate(self) -> None:
        parts = tuple(_resolve(p) for p in self.parts)
        if len(parts) < 2:
            raise AdapterError(f"A union needs two methods or more, got {len(parts)}; name them joined by '+', "
                               "e.g. 'e_adapter+l_adapter'.")
        nested = [p.method for p in parts if isinstance(p, ConfigUnion)]
        if nested:
            raise AdapterError("A union cannot hold another union; list all the methods in one, joined by '+'.")
        shared = {name: getattr(self, name) for name in _SHARED
                  if getattr(self, name) != next(f for f in fields(AdapterConfig) if f.name == name).default}
        object.__setattr__(self, "parts", tuple(p.replace(**shared) if shared else p for p in parts))
        object.__setattr__(self, "_owners", {})

    def placed_sites(self, layout) -> list[Site]:
        sites: list[Site] = []
        owners: dict[str, int] = {}
        for i, part in enumerate(self.parts):
            for site in part.placed_sites(layout):
                if site.key in owners:
                    raise AdapterError(
                        f"'{self.parts[owners[site.key]].method}' and '{part.method}' both choose '{site.place_id}'; a "
                        "union holds one module per place. Add them as two adapters and Stack them instead.")
                owners[site.key] = i
                sites.append(site)
        object.__setattr__(self, "_owners", owners)
        return sites

    def sites(self, layout) -> list[Site]:
        return self.placed_sites(layout)

    def build_unit(self, site: Site) -> nn.Module:
        owner = self._owners.get(site.key)
        if owner is None:
            raise AdapterError(f"No part of this union chose '{site.place_id}'.")
        return self.parts[owner].build_unit(site)

    def replace(self, **changes: Any) -> "ConfigUnion":
        shared = {k: v for k, v in changes.items() if k in _SHARED or k == "parts"}
        own = {k: v for k, v in changes.items() if k not in shared}
        parts = self.parts
        for key, value in own.items():
            takers = [p for p in parts if key in {f.name for f in fields(p)}]
            if not takers:
                _check_option_names(type(parts[0]), {key: value})  # the "did you mean" error
            parts = tuple(p.replace(**{key: value}) if p in takers else p for p in parts)
        return dataclasses.replace(self, **{**shared, "parts": shared.get("parts", parts)})

    def as_saved(self) -> "ConfigUnion":
        """Each part as it saves itself (prefix tuning: ``flat=True``)."""
        return self._each(lambda p: p.as_saved())

    def for_loading(self) -> "ConfigUnion":
        return self._each(lambda p: p.for_loading())

    def _each(self, change) -> "ConfigUnion":
        """The union of ``change(part)`` for every part, the places each part chose kept."""
        out = dataclasses.replace(self, parts=tuple(change(p) for p in self.parts))
        object.__setattr__(out, "_owners", self._owners)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["parts"] = [p.to_dict() for p in self.parts]
        return out


def union_of(names: str) -> ConfigUnion:
    """``"e_adapter+l_adapter"`` -> the union of those presets / methods."""
    return ConfigUnion(parts=tuple(n.strip() for n in names.split("+") if n.strip()))


@register_name_form
def _union_name(key: str) -> "ConfigUnion | None":
    """``resolve_config("e_adapter+l_adapter")``: a union of the methods joined by ``+``."""
    return union_of(key) if "+" in key else None
