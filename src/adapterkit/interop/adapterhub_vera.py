"""AdapterHub VeRA (``architecture: lora`` with ``vera_d`` / ``vera_b``) <-> adapterkit's ``vera``.

AdapterHub's ``Vera`` (``adapters`` 1.x, ``methods/lora.py``) computes ``(alpha / r) * Lb B Ld A x``
with ``Ld = vera_D`` (r, r) and ``Lb = vera_B`` (out, out) trained full matrices (diagonal at init:
``vera_d``, ``vera_b``), saved as ``<module>.loras.<name>.vera_D`` / ``vera_B``, and one pair of
random matrices for the whole adapter, ``shared_parameters.<name>.lora_A`` (r, in) / ``lora_B``
(out, r), saved too (drawn without a seed). That is adapterkit's ``vera`` with
``full_scaling=True`` (``methods/vera.py``): the matrices map to ``vera_lambda_d`` / ``vera_lambda_b``
and ``vera_A`` / ``vera_B``, and ``alpha / r`` is folded into ``vera_lambda_b`` on reading.

Writing, ``alpha = r`` (a factor of one) keeps the matrices as they are, so a round trip is exact;
a VeRA with vectors (the paper's and PEFT's form) is written as the diagonal matrices they are.
AdapterHub shares one ``A`` and ``B`` between all adapted layers, so they must all have the same
shape (query and value, say) and hold the same matrices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AdapterError, CheckpointError
from ..layouts import linear_features
from ..methods.vera import VeRAConfig, draw_projections
from .meta import refuse_options
from .places import module_at, peer_path, place_of, placement


def read(ah: dict, tensors: dict, name: str, model, weights_file: Path, *, sliced: dict):
    config_file = weights_file.parent / "adapter_config.json"
    if ah.get("composition_mode", "add") != "add":
        raise CheckpointError(f"'{config_file}': VeRA with composition_mode={ah['composition_mode']!r}; AdapterHub's "
                              "VeRA adds (composition_mode 'add').")
    layout = model.layout
    shared: dict[str, torch.Tensor] = {}
    sites: dict[str, dict[str, torch.Tensor]] = {}
    origins: dict[str, str] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"(?:.*\.)?shared_parameters\.{re.escape(name)}\.(lora_A|lora_B)", key)
        if m:
            shared[m.group(1)] = value
            continue
        m = re.fullmatch(rf"(.+)\.loras\.{re.escape(name)}\.(vera_D|vera_B)", key)
        if not m:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for a VeRA adapter; the file was edited "
                                  "or belongs to another adapter.")
        place = place_of(layout, m.group(1), f"'{weights_file}', key '{key}'")
        module_at(layout, place, f"'{weights_file}', key '{key}'")
        if layout.spec is not None and place.endswith("." + sliced.get(id(layout.spec), "-")):
            raise CheckpointError(f"'{weights_file}': key '{key}': AdapterHub adapts slices of {layout.model_type}'s "
                                  "fused projection, which adapterkit's VeRA (on the whole module) cannot express.")
        sites.setdefault(place, {})["vera_lambda_d" if m.group(2) == "vera_D" else "vera_lambda_b"] = value
        origins[place] = f"{m.group(1)}.loras.{name}"
    if set(shared) != {"lora_A", "lora_B"}:
        raise CheckpointError(f"'{weights_file}': AdapterHub's VeRA keeps its random matrices in "
                              f"'shared_parameters.{name}.lora_A' / 'lora_B'; {sorted(shared) or 'neither'} found. "
                              "The file is incomplete.")
    r = int(ah.get("r", 8))
    scaling = float(ah.get("alpha", 8)) / r
    for place, params in sites.items():
        if set(params) != {"vera_lambda_d", "vera_lambda_b"}:
            raise CheckpointError(f"'{weights_file}': the VeRA of '{origins[place]}' lacks vera_D or vera_B; the file "
                                  "is incomplete.")
        params["vera_lambda_b"] = params["vera_lambda_b"] * scaling  # AdapterHub's alpha / r, folded in
        params["vera_A"], params["vera_B"] = shared["lora_A"], shared["lora_B"]
    options = placement(layout, list(sites), f"'{weights_file}'")
    options.update(r=r, dropout=float(ah.get("dropout") or 0.0), full_scaling=True,
                   d_initial=float(ah.get("vera_d") if ah.get("vera_d") is not None else 0.1))
    try:
        return VeRAConfig(**options), sites, origins
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None


def write(config: VeRAConfig, sites: dict, name: str, layout, *, locations: Callable) -> tuple[dict[str, Any], dict]:
    refuse_options(config, {"roles", "target_modules", "layers", "leave_out", "r", "dropout", "full_scaling",
                            "projection_prng_key", "d_initial"}, "AdapterHub")
    ah_locations = locations(sites, layout, "VeRA")
    pairs = [(p["vera_A"], p["vera_B"]) for p in sites.values() if "vera_A" in p]
    if not pairs:  # vectors: the matrices are the seed's draw, as the config draws them
        widths = {(p["vera_lambda_d"].shape[0], p["vera_lambda_b"].shape[0]) for p in sites.values()}
        ins = {linear_features(module_at(layout, place, "AdapterHub"))[0] for place in sites}
        if len(widths) != 1 or len(ins) != 1:
            raise AdapterError("AdapterHub's VeRA shares one pair of random matrices of one shape between all its "
                               "layers; this VeRA adapts layers of different shapes; nothing was written.")
        a, b = draw_projections(config.projection_prng_key, config.r, ins.pop(), widths.pop()[1])
        pairs = [(a, b)]
    a, b = pairs[0]
    if any(x.shape != a.shape or y.shape != b.shape or not (torch.equal(x, a) and torch.equal(y, b)) for x, y in pairs):
        raise AdapterError("AdapterHub's VeRA shares one pair of random matrices of one shape between all its layers; "
                           "this VeRA's layers differ; nothing was written.")
    out = {f"shared_parameters.{name}.lora_A": a.contiguous(), f"shared_parameters.{name}.lora_B": b.contiguous()}
    for place, params in sites.items():
        d, lb = params["vera_lambda_d"], params["vera_lambda_b"]
        prefix = f"{peer_path(layout, place, with_prefix=False)}.loras.{name}"
        out[f"{prefix}.vera_D"] = d if d.dim() == 2 else torch.diag(d)
        out[f"{prefix}.vera_B"] = lb if lb.dim() == 2 else torch.diag(lb)
    ah = {"architecture": "lora", **ah_locations, "r": config.r, "alpha": config.r, "dropout": config.dropout,
          "composition_mode": "add", "init_weights": "vera", "init_weights_seed": None, "use_gating": False,
          "use_dora": False, "vera_d": config.d_initial, "vera_b": 0.0, "dtype": None}
    return ah, out
