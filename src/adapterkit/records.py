"""The adapters of a handle, in one store: each adapter's record and its modules.

An ``AdapterRecord`` is everything about one adapter: its config, the sites it occupies and its
modules (one unit per site, keyed by ``Site.key``). ``Adapters`` is what
``AdapterModel.adapters`` holds: an ``nn.ModuleDict`` of the records' modules by adapter name
(so they are registered, moved, saved in ``state_dict`` as ``adapters.<name>.<site>.*``) that
also keeps the records; ``records`` is a read-only view of them. Adding and removing go through
``attach`` and ``detach``, so the modules and the records cannot drift apart. The store also
keeps, per slot (site key and place), the units there by adapter name (``units_at``), updated by
``attach`` and ``detach`` in the adapter's own sites only: finding a slot's units never walks
every adapter, so a setup change costs the same with ten or ten thousand adapters loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from torch import nn

from .config import AdapterConfig
from .places.slots import Site


@dataclass
class AdapterRecord:
    """Everything about one adapter: its config, the sites it occupies and its modules (keyed by
    ``Site.key``)."""

    name: str
    config: AdapterConfig
    sites: list[Site]
    modules: nn.ModuleDict

    def site(self, key: str) -> Site:
        return next(s for s in self.sites if s.key == key)


class Adapters(nn.ModuleDict):
    """The adapters' modules by name, and their records (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._records: dict[str, AdapterRecord] = {}
        self._at: dict[tuple[str, str], dict[str, nn.Module]] = {}  # (site key, place) -> name -> unit

    @property
    def records(self) -> Mapping[str, AdapterRecord]:
        """Every adapter's record, by name, in the order they were added; read-only."""
        return MappingProxyType(self._records)

    def units_at(self, key: str, place: str) -> Mapping[str, nn.Module]:
        """The units at one slot by adapter name, in the order the adapters were added; a
        read-only live view (it follows later ``attach`` and ``detach``)."""
        return MappingProxyType(self._at.get((key, place), _EMPTY))

    def attach(self, record: AdapterRecord) -> None:
        self[record.name] = record.modules
        self._records[record.name] = record
        for key, place in _slot_keys(record):
            self._at.setdefault((key, place), {})[record.name] = record.modules[key]

    def detach(self, name: str) -> AdapterRecord:
        del self[name]
        record = self._records.pop(name)
        for key, place in _slot_keys(record):
            units = self._at[(key, place)]
            del units[name]
            if not units:
                del self._at[(key, place)]
        return record


_EMPTY: dict[str, nn.Module] = {}


def _slot_keys(record: AdapterRecord) -> list[tuple[str, str]]:
    """The slots (site key, place) where ``record`` has a unit: one per site key, at the place
    of its first site of that key (``AdapterRecord.site``)."""
    seen: dict[str, str] = {}
    for site in record.sites:
        if site.key in record.modules:
            seen.setdefault(site.key, site.place)
    return list(seen.items())


def summary(records: Mapping[str, AdapterRecord], heads: Mapping[str, nn.Module], base: nn.Module, active: set,
            merged: set, as_dict: bool = False):
    """``AdapterModel.adapter_summary``: per adapter its method, parameters (and % of ``base``'s),
    head parameters, and whether it is active, trainable and merged; a table, or its rows."""
    total = sum(p.numel() for p in base.parameters())
    rows = []
    for name, record in records.items():
        module = record.modules
        params = sum(p.numel() for p in module.parameters())
        rows.append({
            "name": name,
            "method": record.config.method,
            "parameters": params,
            "head_parameters": sum(p.numel() for p in heads[name].parameters()) if name in heads else 0,
            "percent_of_base": 100.0 * params / max(total, 1),
            "active": name in active,
            "trainable": any(p.requires_grad for p in module.parameters()),
            "merged": name in merged,
        })
    if as_dict:
        return rows
    header = f"{'name':<20}{'method':<12}{'parameters':>12}{'% of base':>11}{'head':>10}  active  trainable  merged"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name']:<20}{r['method']:<12}{r['parameters']:>12,}{r['percent_of_base']:>10.3f}%"
            f"{r['head_parameters']:>10,}  {'yes' if r['active'] else 'no':<6}  "
            f"{'yes' if r['trainable'] else 'no':<9}  {'yes' if r['merged'] else 'no'}"
        )
    lines.append(f"base model parameters: {total:,}")
    return "\n".join(lines)
