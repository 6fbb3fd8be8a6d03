"""AdapterHub prefix tuning (``architecture: prefix_tuning``, with ``use_gating``) <-> adapterkit's.

AdapterHub keeps a model's prefixes in one ``PrefixTuningPool``, per adapter and location key
(``self_prefix``: the self-attention of a single-stack model): the MLP ``wte.weight`` (P, d) and
``control_trans.{0,2}.{weight,bias}`` (Linear(d, bottleneck), act, Linear(bottleneck, layers * 2 *
d)), or, ``flat``, the prefixes themselves as ``control_trans`` (P * layers * 2 * d,), saved as
``prefix_tuning.prefix_tunings.<name>.self_prefix.<param>``. AdapterHub 1.3 saves the same tensors
again under every layer's ``....attention.self.prefix_tuning.pool.``, which is why it can only write
them pickled (``pytorch_adapter.bin``, read with ``allow_pickle=True``); those copies are checked
equal and skipped. Gates (``use_gating``): ``<layer>.attention.self.prefix_tuning.prefix_gates.
<name>.{weight,bias}``, a Linear(d, 1 or 2) per layer.

adapterkit's ``PrefixTuning`` keeps the MLP under the same names and rows (layer ``i``'s keys then
values), so the MLP form maps key for key; a flat prefix is a permutation of adapterkit's ``prefix``
(layers, 2, P, d); gate ``i`` is ``gates.<j>``, ``j`` counting the chosen layers. Writing, the
adapter is flat (how adapterkit saves a prefix: ``PrefixTuningConfig.as_saved``), and each
chosen layer's gate is written to its layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, CheckpointError
from ..layouts import select_layers
from ..methods.prefix_tuning import PrefixTuningConfig
from .meta import refuse_options
from .places import peer_path, single_stack

READ = {"architecture", "prefix_length", "bottleneck_size", "non_linearity", "dropout", "flat", "encoder_prefix",
        "cross_prefix", "leave_out", "use_gating", "shared_gating", "init_weights_seed"}
LOCATION = "self_prefix"
PLACE = "layers.self_attention"


def _attention_path(layout, layer: int) -> str:
    """AdapterHub's path of layer ``layer``'s self-attention (where its ``prefix_tuning`` sits)."""
    query = layout.spec.stacks[next(iter(layout.stacks))].linears["q"]
    return peer_path(layout, f"layers.{layer}.{query.rpartition('.')[0]}", with_prefix=False)


def _supported(layout) -> bool:
    """AdapterHub prefix tuning is read and written on single-stack encoders (BERT, RoBERTa, ...)."""
    stack = single_stack(layout)
    return stack is not None and "q" in stack.spec.linears and not layout.is_decoder


def read(ah: dict, tensors: dict, name: str, model, weights_file: Path):
    config_file = weights_file.parent / "adapter_config.json"
    for key, value in ah.items():
        if key not in READ and value not in (None, False):
            raise CheckpointError(f"'{config_file}': config option '{key}' = {value!r} has no adapterkit counterpart "
                                  "in prefix tuning; only adapters without it can be loaded.")
    layout = model.layout
    if not _supported(layout):
        raise CheckpointError(f"'{weights_file}': adapterkit reads AdapterHub prefix tuning on single-stack encoders "
                              f"(BERT, RoBERTa, ...), not on {layout.model_type}.")
    options = dict(prefix_length=int(ah.get("prefix_length", 30)), bottleneck_size=int(ah.get("bottleneck_size", 512)),
                   non_linearity=str(ah.get("non_linearity", "tanh")), dropout=float(ah.get("dropout") or 0.0),
                   flat=bool(ah.get("flat")), leave_out=tuple(ah.get("leave_out") or ()),
                   use_gating=bool(ah.get("use_gating")), shared_gating=bool(ah.get("shared_gating", True)))
    try:
        config = PrefixTuningConfig(**options)
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None
    layers = select_layers(layout.num_layers, None, config.leave_out)
    pool = rf"(?:.*\.)?prefix_tuning\.(?:pool\.)?prefix_tunings\.{re.escape(name)}\.{LOCATION}\.(.+)"
    gate = rf"(.+)\.prefix_tuning\.prefix_gates\.{re.escape(name)}\.(weight|bias)"
    params: dict[str, torch.Tensor] = {}
    copies: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(pool, key)
        if m and ".prefix_tuning.pool." in key:
            copies[key] = (m.group(1), value)
            continue
        if m:
            params[m.group(1)] = value
            continue
        m = re.fullmatch(gate, key)
        i = next((i for i in layers if f".{m.group(1)}".endswith(f".{_attention_path(layout, i)}")), None) if m else None
        if i is None:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for a prefix tuning adapter on this "
                                  f"{layout.model_type} model; the file was edited or belongs to another adapter.")
        params[f"gates.{layers.index(i)}.{m.group(2)}"] = value
    for key, (param, value) in copies.items():
        if param not in params or not torch.equal(params[param], value):
            raise CheckpointError(f"'{weights_file}': '{key}' differs from the pool's own tensor; the file was edited.")
    if config.flat and "control_trans" in params:  # (P * L * 2 * d,) -> (L, 2, P, d)
        flat = params.pop("control_trans")
        width = layout.hidden_size
        if flat.numel() != config.prefix_length * len(layers) * 2 * width:
            raise CheckpointError(f"'{weights_file}': the flat prefix has {flat.numel()} values, not prefix_length x "
                                  f"layers x 2 x hidden size; the adapter was made for another base model.")
        params["prefix"] = flat.view(config.prefix_length, len(layers), 2, width).permute(1, 2, 0, 3).contiguous()
    return config, {PLACE: params}, {PLACE: f"prefix_tuning.prefix_tunings.{name}.{LOCATION}"}


def write(config: PrefixTuningConfig, sites: dict, name: str, layout) -> tuple[dict[str, Any], dict]:
    refuse_options(config, {"prefix_length", "bottleneck_size", "non_linearity", "dropout", "flat", "leave_out",
                            "use_gating", "shared_gating", "encoder_prefix", "cross_prefix"}, "AdapterHub")
    if not _supported(layout):
        raise AdapterError(f"adapterkit writes AdapterHub prefix tuning for single-stack encoders (BERT, RoBERTa, ...), "
                           f"not {layout.model_type}; nothing was written. Save it with format='adapterkit' or 'peft'.")
    if set(sites) != {PLACE}:
        raise AdapterError(f"AdapterHub's prefix tuning sits in the self-attention only; this adapter's places are "
                           f"{sorted(sites)}. Nothing was written.")
    params = dict(sites[PLACE])
    layers = select_layers(layout.num_layers, None, config.leave_out)
    prefix = params.pop("prefix")  # (L, 2, P, d): saved adapters are flat
    out = {f"prefix_tuning.prefix_tunings.{name}.{LOCATION}.control_trans": prefix.permute(2, 0, 1, 3).reshape(-1)}
    for param, value in params.items():
        m = re.fullmatch(r"gates\.(\d+)\.(weight|bias)", param)
        out[f"{_attention_path(layout, layers[int(m.group(1))])}.prefix_tuning.prefix_gates.{name}.{m.group(2)}"] = value
    ah = {"architecture": "prefix_tuning", "prefix_length": config.prefix_length,
          "bottleneck_size": config.bottleneck_size, "non_linearity": config.non_linearity, "dropout": config.dropout,
          "flat": True, "encoder_prefix": True, "cross_prefix": True, "leave_out": list(config.leave_out),
          "use_gating": config.use_gating, "shared_gating": config.shared_gating, "init_weights_seed": None}
    return ah, out
