"""AdapterHub's AdapterFusion folders: ``adapter_fusion_config.json`` (``adapter_names``,
``config``, ``model_type``, ``hidden_size``, ``name``) + ``model_adapter_fusion.safetensors``,
as ``save_adapter_fusion(..., use_safetensors=True)`` writes them in AdapterHub 1.x.

Tensor names are ``<layer>.<location>.adapter_fusion_layer.<a,b>.{query,key}.{weight,bias}`` and
``...value.weight``, with or without the base-model prefix (``bert.``), at the bottleneck
locations of ``interop.adapterhub`` (``attention.output``: ``attn_out``, ``output``:
``ffn_out`` on BERT). They map one to one onto ``fusion.FusionUnit`` (``query``, ``key``,
``value``). The options map as follows; what has no counterpart is refused, naming it:

* ``query``, ``key`` must be on (AdapterHub's "dense" variant without them is not supported);
* ``value`` off (``"static"``) loads as ``W_v = I``, the same function;
* ``value_before_softmax`` either way (``W_v`` is linear: the same function);
* ``residual_before``, ``query_before_ln``, ``regularization``: ``FusionConfig``'s fields;
* ``temperature: true`` anneals the softmax temperature from 50 by 0.05 per forward call, a
  state AdapterHub neither saves nor restores: refused;
* ``dropout_prob`` (on the attention scores, training only) is dropped: inference is unchanged.

Pickled weights (``pytorch_model_adapter_fusion.bin``) are refused: they can run code when
loaded. AdapterHub writes safetensors with ``use_safetensors=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, CheckpointError
from ..composition.fuse import FusionConfig
from .adapterhub import BOTTLENECK_LOCATIONS, VERSION, read_config
from .files import read_weights, write_folder
from .places import peer_path, place_of

CONFIG, WEIGHTS, PICKLED = "adapter_fusion_config.json", "model_adapter_fusion.safetensors", \
    "pytorch_model_adapter_fusion.bin"
FILES = frozenset({CONFIG, WEIGHTS, PICKLED})
#: AdapterHub options that must have this value (what adapterkit's fusion layer computes)
REQUIRED = {"query": True, "key": True, "temperature": False}
KNOWN = {"key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
         "value_before_softmax", "value_initialized", "dropout_prob"}


def is_adapterhub_fusion(directory: "str | Path") -> bool:
    """Whether ``directory`` holds an AdapterHub fusion (its config file)."""
    return (Path(directory) / CONFIG).is_file()


def read(folder: "str | Path", model) -> tuple[list[str], FusionConfig, dict[str, torch.Tensor]]:
    """``(adapter names, config, {"<site key>.<param>": tensor})`` of an AdapterHub fusion folder,
    for ``model`` (an ``AdapterModel`` holding the fused adapters)."""
    folder = Path(folder)
    config_file = folder / CONFIG
    layout = model.layout
    data = read_config(config_file, layout, "fusion")
    names = data.get("adapter_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise CheckpointError(f"'{config_file}': 'adapter_names' must list the fused adapters; the file is corrupt.")
    config = _config(data.get("config"), config_file)
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / PICKLED).is_file():
            raise CheckpointError(
                f"'{folder / PICKLED}' is a pickled PyTorch file, which can run code when it is loaded; adapterkit "
                "reads AdapterFusion weights from safetensors only. Save the fusion again in AdapterHub with "
                f"model.save_adapter_fusion(dir, {','.join(names)!r}, use_safetensors=True).")
        raise CheckpointError(f"'{weights}' is missing; the fusion folder is incomplete.")
    tensors, _ = read_weights(folder, WEIGHTS, PICKLED, allow_pickle=False)
    where_is = _locations(layout, weights)
    fusion_name = re.escape(str(data.get("name") or ",".join(names)))
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"(.+)\.adapter_fusion_layer\.{fusion_name}\.(query\.weight|query\.bias|key\.weight|"
                         r"key\.bias|value\.weight)", key)
        if not m:
            raise CheckpointError(f"'{weights}': unexpected key '{key}' for fusion {data.get('name')!r}; the file was "
                                  "edited or belongs to another fusion.")
        place = place_of(layout, m.group(1), f"'{weights}', key '{key}'")
        _, layer, location = place.split(".", 2)
        if location not in where_is:
            raise CheckpointError(f"'{weights}': key '{key}' is not at a bottleneck location adapterkit knows.")
        out[f"layers-{layer}-{where_is[location]}.{m.group(2)}"] = value
    if not data["config"].get("value", True):  # "static": no value matrix, the same as W_v = I
        for site in {k.split(".", 1)[0] for k in out}:
            width = out[f"{site}.query.weight"].shape[0]
            out[f"{site}.value.weight"] = torch.eye(width, dtype=out[f"{site}.query.weight"].dtype)
    return names, config, out


def _config(ah: Any, config_file: Path) -> FusionConfig:
    if not isinstance(ah, dict):
        raise CheckpointError(f"'{config_file}': 'config' must be an object (AdapterHub saves the full config).")
    unknown = sorted(set(ah) - KNOWN)
    if unknown:
        raise CheckpointError(f"'{config_file}': unknown fusion option(s) {unknown}; this AdapterHub version's fusions "
                              "are not supported.")
    for key, value in REQUIRED.items():
        if bool(ah.get(key, value)) != value:
            why = ("anneals the softmax temperature per forward call, a state AdapterHub does not save"
                   if key == "temperature" else "has no adapterkit counterpart")
            raise CheckpointError(f"'{config_file}': fusion option '{key}' = {ah[key]!r} {why}; only fusions with "
                                  f"{key}={value} can be loaded.")
    return FusionConfig(regularization=bool(ah.get("regularization", True)),
                        residual_before=bool(ah.get("residual_before", False)),
                        query_before_ln=bool(ah.get("query_before_ln", False)))


def _locations(layout, where: Path) -> dict[str, str]:
    """AdapterHub's bottleneck location -> adapterkit place (``output`` -> ``ffn_out`` on BERT)."""
    if layout.spec is None or id(layout.spec) not in BOTTLENECK_LOCATIONS:
        raise CheckpointError(f"'{where}': adapterkit reads AdapterHub fusions on BERT, RoBERTa, DistilBERT, GPT-2 "
                              f"and Llama-family models, not on {layout.model_type}.")
    return {v: k for k, v in BOTTLENECK_LOCATIONS[id(layout.spec)].items()}


def write(directory: "str | Path", names: list[str], config: FusionConfig, state: dict[str, torch.Tensor],
          model) -> Path:
    """Write a fusion (``state``: ``"<site key>.<param>"`` of its ``FusionUnit``s) as an
    AdapterHub fusion folder; what AdapterHub cannot express is refused before anything is written."""
    layout = model.layout
    if config.temperature != 1.0:
        raise AdapterError(f"AdapterHub's fusion has no temperature {config.temperature} (only 1, or its annealed "
                           "schedule); nothing was written.")
    if config.regularization and config.reg_weight != 0.01:
        raise AdapterError(f"AdapterHub regularises fusion values with weight 0.01, not {config.reg_weight}; "
                           "nothing was written.")
    if layout.spec is None or id(layout.spec) not in BOTTLENECK_LOCATIONS:
        raise AdapterError(f"adapterkit writes AdapterHub fusions for BERT, RoBERTa, DistilBERT, GPT-2 and "
                           f"Llama-family models, not {layout.model_type}; nothing was written.")
    locations = BOTTLENECK_LOCATIONS[id(layout.spec)]
    key = ",".join(names)
    out = {}
    for name, value in state.items():
        site, param = name.split(".", 1)
        m = re.fullmatch(r"layers-(\d+)-(attn_out|ffn_out)", site)
        if not m:
            raise AdapterError(f"AdapterHub fuses bottleneck adapters after attention or the FFN; this fusion has a "
                               f"layer at '{site.replace('-', '.')}'. Nothing was written.")
        # with the base-model prefix, as AdapterHub writes them: its fusion loader reads keys
        # without one into a model with a head (AutoAdapterModel) silently not at all
        path = peer_path(layout, f"layers.{m.group(1)}.{locations[m.group(2)]}", with_prefix=True)
        out[f"{path}.adapter_fusion_layer.{key}.{param}"] = value
    ah = {"key": True, "query": True, "value": True, "query_before_ln": config.query_before_ln,
          "regularization": config.regularization, "residual_before": config.residual_before, "temperature": False,
          "value_before_softmax": True, "value_initialized": True, "dropout_prob": None}
    info = {"adapter_names": list(names), "config": ah, "hidden_size": layout.hidden_size,
            "model_type": layout.model_type, "model_class": type(layout.model).__name__,
            "model_name": getattr(getattr(layout.model, "config", None), "_name_or_path", "") or "", "name": key,
            "version": VERSION}
    return write_folder(directory, {CONFIG: info}, {WEIGHTS: out}, FILES)
