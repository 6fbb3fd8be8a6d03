"""adapterkit's in-memory checkpoint, as the foreign readers build it and the writers read it.

The pair is what ``io.read_checkpoint`` returns: ``meta`` (``name``, ``config``, ``places``,
``base_model``, ``head``) and tensors under ``adapter.<site key>.<param>`` / ``head.<param>``,
so that ``AdapterModel.load_adapter`` validates and loads every format through one path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..config import AdapterConfig
from ..errors import AdapterError, CheckpointError
from ..heads import HeadConfig


def checkpoint(model, name: str, config: AdapterConfig, by_place: dict[str, dict[str, torch.Tensor]],
               head: Optional[HeadConfig], head_tensors: dict[str, torch.Tensor], where: str,
               base_model: Optional[dict] = None, origins: Optional[dict[str, str]] = None
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` for an adapter with ``config`` whose weights are ``{place id: {param:
    tensor}}``; the places the config resolves to in ``model`` must be exactly those, each with
    exactly the weights (names and shapes) its module has. ``origins`` names each place as the
    source file does, for errors."""
    try:
        sites = config.placed_sites(model.layout)
    except AdapterError as err:
        raise CheckpointError(f"{where}: {err}") from None
    places = [s.place_id for s in sites]
    if set(places) != set(by_place):
        missing = [(origins or {}).get(p, p) for p in sorted(set(places) - set(by_place))]
        extra = [(origins or {}).get(p, p) for p in sorted(set(by_place) - set(places))]
        raise CheckpointError(f"{where}: the config selects modules {missing[:4]} that have no weights, or weights "
                              f"{extra[:4]} sit on modules the config does not select; the folder was edited.")
    for site in sites:  # the weights each module needs, named as the source file names them
        expected = {k: tuple(v.shape) for k, v in config.for_loading().build_unit(site).state_dict().items()}
        given = by_place[site.place_id]
        missing = sorted(set(expected) - set(given))
        wrong = sorted(k for k in set(expected) & set(given) if tuple(given[k].shape) != expected[k])
        if missing or wrong:
            what = origins.get(site.place_id, site.place_id) if origins else site.place_id
            detail = f"lacks {missing}" if missing else (
                f"has {wrong[0]} of shape {tuple(given[wrong[0]].shape)} where this model needs {expected[wrong[0]]} "
                "(another hidden size?)")
            raise CheckpointError(f"{where}: the adapter at '{what}' {detail}; the file is incomplete or the adapter "
                                  "was made for another base model.")
    tensors = {f"adapter.{s.key}.{param}": value for s in sites for param, value in by_place[s.place_id].items()}
    tensors.update({f"head.{k}": v for k, v in head_tensors.items()})
    meta = {"name": name, "config": config.to_dict(), "places": places, "base_model": base_model or {},
            "head": head.to_dict() if head is not None else None}
    return meta, tensors


def by_place(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{place id: {param: tensor}}`` of an in-memory checkpoint (the writers' view)."""
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in meta["places"]}
    keys = {p.replace(".", "-"): p for p in meta["places"]}
    for key, value in tensors.items():
        if key.startswith("adapter."):
            site_key, param = key[len("adapter."):].split(".", 1)
            out[keys[site_key]][param] = value
    return out


def head_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}


def refuse_options(config: AdapterConfig, handled: set[str], target: str) -> None:
    """Refuse a config whose options beyond ``handled`` differ from their defaults: ``target``
    (the foreign format) has no way to express them."""
    odd = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
           if f.name not in handled and getattr(config, f.name) != f.default]
    if odd:
        raise AdapterError(f"{target} has no counterpart for the {config.method} option(s) {', '.join(odd)}; "
                           "nothing was written. Keep the adapter in adapterkit's format to keep them.")
