"""AdapterHub ReFT (``architecture: reft``: LoReFT, NoReFT) <-> adapterkit's ``reft``.

AdapterHub hooks a ``ReftLayer`` on every block's output and saves each chosen layer's
``ReftModule`` as ``<block path>.reft_layer.refts.<name>.units.<i>.learned_source.{weight,bias}``
and ``units.<i>.projection.weight`` (or, orthogonal, ``projection.parametrizations.weight.original``
and ``...weight.0.base``): the names of adapterkit's ``Reft`` module below the block, so tensors map
key for key and the place is ``layers.<i>.output``. ``subtract_projection`` is a class attribute
there, not saved: a saved ReFT adapter subtracts the projection (LoReFT, NoReFT); DiReFT
(``subtract_projection=False``) is refused on writing since AdapterHub would not read it back as such.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import AdapterError, CheckpointError
from ..methods.reft import ReftConfig
from .meta import refuse_options
from .places import peer_path, single_stack

READ = {"architecture", "layers", "prefix_positions", "suffix_positions", "r", "orthogonality", "tied_weights",
        "dropout", "non_linearity", "dtype", "output_reft", "init_weights_seed"}


def read(ah: dict, tensors: dict, name: str, model, weights_file: Path):
    config_file = weights_file.parent / "adapter_config.json"
    for key, value in ah.items():
        if key not in READ and value not in (None, False):
            raise CheckpointError(f"'{config_file}': config option '{key}' = {value!r} has no adapterkit counterpart "
                                  "in ReFT; only adapters without it can be loaded.")
    if ah.get("dtype") not in (None, "float32"):
        raise CheckpointError(f"'{config_file}': dtype={ah['dtype']!r}; adapterkit reads float32 ReFT adapters.")
    layout = model.layout
    stack = single_stack(layout)
    if stack is None:
        raise CheckpointError(f"'{weights_file}': AdapterHub ReFT adapters are read on single-stack models (BERT, "
                              f"GPT-2, Llama, ...), not on {layout.model_type}.")
    sites: dict[str, dict] = {}
    origins: dict[str, str] = {}
    pattern = rf"(?:.*\.)?{re.escape(stack.spec.layers)}\.(\d+)\.reft_layer\.refts\.{re.escape(name)}\.(.+)"
    for key, value in tensors.items():
        m = re.fullmatch(pattern, key)
        if not m:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for a ReFT adapter; the file was edited or "
                                  "belongs to another adapter.")
        i = int(m.group(1))
        if i >= layout.num_layers:
            raise CheckpointError(f"'{weights_file}': key '{key}': layer {i} does not exist; this {layout.model_type} "
                                  f"model has {layout.num_layers} layers.")
        sites.setdefault(f"layers.{i}.output", {})[m.group(2)] = value
        origins[f"layers.{i}.output"] = key.rsplit(".units.", 1)[0]
    layers = sorted(int(p.split(".")[1]) for p in sites)
    wanted = ah.get("layers", "all")
    options = dict(layers=None if wanted == "all" else tuple(layers), prefix_positions=int(ah.get("prefix_positions", 3)),
                   suffix_positions=int(ah.get("suffix_positions", 0)), r=int(ah.get("r", 1)),
                   orthogonality=bool(ah.get("orthogonality", True)), tied_weights=bool(ah.get("tied_weights")),
                   dropout=float(ah.get("dropout") or 0.0), non_linearity=ah.get("non_linearity"))
    try:
        return ReftConfig(**options), sites, origins
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None


def write(config: ReftConfig, sites: dict, name: str, layout) -> tuple[dict[str, Any], dict]:
    refuse_options(config, {"layers", "leave_out", "prefix_positions", "suffix_positions", "r", "orthogonality",
                            "tied_weights", "dropout", "non_linearity"}, "AdapterHub")
    if not config.subtract_projection:
        raise AdapterError("AdapterHub does not save subtract_projection (DiReFT); it would read this adapter back as "
                           "LoReFT. Nothing was written: save it with format='adapterkit'.")
    out = {}
    for place, params in sites.items():
        layer = place.split(".")[1]
        block = peer_path(layout, f"layers.{layer}.x", with_prefix=False).rsplit(".", 1)[0]
        for param, value in params.items():
            out[f"{block}.reft_layer.refts.{name}.{param}"] = value.contiguous()
    layers = sorted(int(p.split(".")[1]) for p in sites)
    ah = {"architecture": "reft", "layers": "all" if len(layers) == layout.num_layers else layers,
          "prefix_positions": config.prefix_positions, "suffix_positions": config.suffix_positions, "r": config.r,
          "orthogonality": config.orthogonality, "tied_weights": config.tied_weights, "dropout": config.dropout,
          "non_linearity": config.non_linearity, "dtype": None, "output_reft": True, "init_weights_seed": None}
    return ah, out
