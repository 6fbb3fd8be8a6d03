"""AdapterHub ``adapters`` checkpoints: ``adapter_config.json`` (``config``, ``model_type``,
``hidden_size``, ``name``) + ``adapter.safetensors`` (or, by opt-in, ``pytorch_adapter.bin``),
and a head in ``head_config.json`` + ``model_head.safetensors`` / ``pytorch_model_head.bin``: a
flexible head (``config`` object, ``AutoAdapterModel``) or the static head of the ``transformers``
task model ``adapters.init`` wrapped (``config: null``, ``model_class``; ``static_heads.py``).

Tensor names are module paths in AdapterHub's model, with or without the base-model prefix
(``bert.``, ``roberta.``, ``transformer.``, ``model.``):

* bottleneck (SeqBn / Pfeiffer, DoubleSeqBn / Houlsby, ParBn): ``<layer>.<location>.adapters.
  <name>.adapter_down.0.weight`` ... where the location is the attention output
  (``attention.output`` / ``attention_adapters``: our ``attn_out``) or the FFN output
  (``output`` / ``output_adapters``: ``ffn_out``); ``adapter_down`` is ``[LayerNorm,] Linear``,
  then ``adapter_up``, ``adapter_norm_after``, ``scaling``;
* LoRA / IA3 (``architecture: lora``, ``composition_mode`` ``add`` / ``scale``):
  ``<module path>.loras.<name>.lora_A`` (r, in) / ``lora_B`` (out, r); IA3 keeps its vector in
  ``lora_B`` (out, 1), scaled by ``alpha``; DoRA (``use_dora``) adds the magnitude ``m.weight``
  (out, 1), read as adapterkit's ``dora`` with AdapterHub's formula (``methods/dora.py``).

Which Linear layers AdapterHub's LoRA options adapt differs by architecture (``LORA_LOCATIONS``,
from its model mixins: on Llama ``intermediate`` is ``mlp.down_proj``). GPT-2's fused ``c_attn``
is adapted in slices there (``LoRAMergedLinear``), which adapterkit's whole-module LoRA is not.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import AdapterConfig, config_from_dict
from ..errors import AdapterError, CheckpointError
from ..heads import HeadConfig
from ..layouts.architectures import BERT_LIKE, DISTILBERT, GPT2, LLAMA_LIKE
from ..methods.bottleneck import INITS, BottleneckConfig
from ..methods.dora import DoRAConfig
from ..methods.ia3 import IA3Config
from ..methods.lora import LoRAConfig
from ..methods.lora_init import as_plain_lora
from . import adapterhub_compacter, adapterhub_prefix, adapterhub_reft, adapterhub_union, adapterhub_vera
from . import heads as H
from .files import read_json, read_weights, write_folder
from .meta import by_place, checkpoint, head_tensors, refuse_options
from .places import module_at, peer_path, place_of, placement, single_stack
from .static_heads import read_static_head

CONFIG, WEIGHTS, PICKLED = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
HEAD_CONFIG, HEAD_WEIGHTS, HEAD_PICKLED = "head_config.json", "model_head.safetensors", "pytorch_model_head.bin"
FILES = frozenset({CONFIG, WEIGHTS, PICKLED, HEAD_CONFIG, HEAD_WEIGHTS, HEAD_PICKLED})
VERSION = "adapters.1.3.0"

#: where AdapterHub keeps the bottleneck layers of one block, per architecture family
BOTTLENECK_LOCATIONS = {
    id(BERT_LIKE): {"attn_out": "attention.output", "ffn_out": "output"},
    id(DISTILBERT): {"attn_out": "attention_adapters", "ffn_out": "output_adapters"},
    id(GPT2): {"attn_out": "attention_adapters", "ffn_out": "output_adapters"},
    id(LLAMA_LIKE): {"attn_out": "attention_adapters", "ffn_out": "output_adapters"},
}
#: layout role -> AdapterHub LoRA option (``attn_matrices`` entry, or ``intermediate`` / ``output``)
LORA_LOCATIONS = {
    id(BERT_LIKE): {"q": "q", "k": "k", "v": "v", "ffn_in": "intermediate", "ffn_proj": "output"},
    id(DISTILBERT): {"q": "q", "k": "k", "v": "v", "ffn_in": "intermediate", "ffn_proj": "output"},
    id(GPT2): {"ffn_in": "intermediate", "ffn_proj": "output"},
    id(LLAMA_LIKE): {"q": "q", "k": "k", "v": "v", "ffn_proj": "intermediate", "ffn_in": "output"},
}
#: AdapterHub's model class with flexible heads, named in head_config.json so it loads the head
FLEX_CLASSES = {"bert": "BertAdapterModel", "roberta": "RobertaAdapterModel", "xlm-roberta": "XLMRobertaAdapterModel",
                "distilbert": "DistilBertAdapterModel", "gpt2": "GPT2AdapterModel", "llama": "LlamaAdapterModel",
                "mistral": "MistralAdapterModel"}
#: fused projections AdapterHub adapts in slices (``LoRAMergedLinear``): no adapterkit counterpart
SLICED = {id(GPT2): "attn.c_attn"}
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
#: BnConfig options read here; those that must be off; the rest only matter with phm_layer
BN_READ = {"mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
           "original_ln_after", "residual_before_ln", "adapter_residual_before_ln", "ln_before", "ln_after",
           "init_weights", "is_parallel", "scaling", "dropout", "leave_out", "stochastic_depth", "architecture",
           "use_gating"}
BN_OFF = {"phm_layer": False, "inv_adapter": None, "cross_adapter": False}
LORA_READ = {"r", "alpha", "dropout", "attn_matrices", "selfattn_lora", "intermediate_lora", "output_lora",
             "leave_out", "composition_mode", "init_weights", "init_weights_seed", "architecture", "dtype", "use_gating"}
LORA_OFF = {"use_dora": False, "vera_d": None, "vera_b": None}


# -- reading -------------------------------------------------------------------------------------------
def read(folder: Path, model, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An AdapterHub folder as adapterkit's in-memory checkpoint, for ``model`` (an ``AdapterModel``)."""
    config_file = folder / CONFIG
    data = read_config(config_file, model.layout, "adapter")
    tensors, weights_file = read_weights(folder, WEIGHTS, PICKLED, allow_pickle=allow_pickle)
    name = str(data.get("name") or "adapter")
    config, sites, origins = from_adapterhub(data["config"], tensors, name, model, weights_file)
    head, head_state, skipped = _read_head(folder, model, allow_pickle)
    fingerprint = {"model_type": data["model_type"], "hidden_size": data["hidden_size"]}
    meta, tensors = checkpoint(model, re.sub(r"[^A-Za-z0-9_\-]", "_", name), config, sites, head, head_state,
                               f"'{weights_file}'", fingerprint, origins)
    if skipped:
        meta["head_skipped"] = skipped  # load_adapter warns with it (when the head was asked for)
    return meta, tensors


def read_config(config_file: Path, layout, what: str) -> dict[str, Any]:
    """An AdapterHub config file (adapter, fusion), refused unless its ``model_type`` and
    ``hidden_size`` are this model's."""
    data = read_json(config_file)
    for key, mine in (("model_type", layout.model_type), ("hidden_size", layout.hidden_size)):
        if data.get(key) != mine:
            raise CheckpointError(f"'{config_file}': {key} is {data.get(key)!r} but this model's is {mine!r}; load the "
                                  f"{what} into the base model it was trained on.")
    return data


def from_adapterhub(ah: Any, tensors: dict[str, torch.Tensor], name: str, model, weights_file: Path
                    ) -> tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """AdapterHub adapter ``name``'s config (``ah``, the ``config`` object AdapterHub saves) and
    tensors (its state-dict entries, any prefix) as an adapterkit config, ``{place id: {param:
    tensor}}`` for ``model``, and each place's AdapterHub module path (for errors).
    ``weights_file`` (the weights' file, next to ``adapter_config.json``) names the source."""
    kind = _kind(ah, weights_file.parent / CONFIG)
    _check_options(ah, READ_OPTIONS[kind], OFF_OPTIONS[kind], weights_file.parent / CONFIG)
    return READERS[kind](ah, tensors, name, model, weights_file)


def _kind(ah: Any, config_file: Path) -> str:
    if not isinstance(ah, dict):
        raise CheckpointError(f"'{config_file}': 'config' must be an object (AdapterHub saves the full config).")
    arch = ah.get("architecture") or "bottleneck"
    if arch == "bottleneck" and ah.get("phm_layer"):
        arch = "compacter"
    if arch == "lora":
        arch = "ia3" if ah.get("composition_mode") == "scale" else ("dora" if ah.get("use_dora") else "lora")
        if arch == "lora" and (ah.get("vera_d") is not None or ah.get("vera_b") is not None):
            arch = "vera"
    if arch not in READERS:
        raise CheckpointError(f"'{config_file}': config architecture {arch!r} is not supported; adapterkit reads "
                              "AdapterHub bottleneck (SeqBn, DoubleSeqBn, ParBn), LoRA, IA3, DoRA, VeRA, ReFT, prefix tuning and "
                              "union (UniPELT) adapters.")
    return arch


def _check_options(ah: dict, read: set, off: dict, config_file: Path) -> None:
    for key, value in off.items():
        if ah.get(key, value) not in (value, None, False):
            raise CheckpointError(f"'{config_file}': config option '{key}' = {ah[key]!r} has no adapterkit "
                                  "counterpart; only adapters without it can be loaded.")
    for key in ah:
        if key not in read and key not in off and not key.startswith(("phm", "shared_", "factorized_", "learn_phm",
                                                                      "hypercomplex", "init_weights_seed",
                                                                      "inv_adapter_reduction")):
            raise CheckpointError(f"'{config_file}': unknown config option '{key}'; this AdapterHub version's "
                                  "adapters are not supported.")


def _keys(tensors: dict, pattern: str, weights_file: Path) -> list[tuple[str, str, str, torch.Tensor]]:
    """``(key, module path, parameter, tensor)`` for every key; any other key is an error."""
    out = []
    for key, value in tensors.items():
        m = re.fullmatch(pattern, key)
        if not m:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for this adapter; the file was edited or "
                                  "belongs to another adapter.")
        out.append((key, m.group(1), m.group(2), value))
    return out


def _bottleneck_param(param: str, ln_before: bool) -> Optional[str]:
    m = re.fullmatch(r"adapter_down\.(\d)\.(weight|bias|W_left|W_right|b)", param)  # PHM: W_left, W_right, b
    if m:
        return f"{'norm_before' if ln_before and m.group(1) == '0' else 'down'}.{m.group(2)}"
    m = re.fullmatch(r"(adapter_up|adapter_norm_before|adapter_norm_after)\.(weight|bias|W_left|W_right|b)", param)
    if m:
        return f"{m.group(1)[len('adapter_'):]}.{m.group(2)}"
    if param in ("gate.weight", "gate.bias"):  # use_gating
        return param
    return "scaling" if param == "scaling" else None


def _read_bottleneck(ah: dict, tensors: dict, name: str, model, weights_file: Path):
    layout = model.layout
    if layout.spec is None or id(layout.spec) not in BOTTLENECK_LOCATIONS:
        raise CheckpointError(f"'{weights_file}': adapterkit places AdapterHub bottleneck adapters on BERT, RoBERTa, "
                              f"DistilBERT, GPT-2 and Llama-family models, not on {layout.model_type}.")
    where_is = {v: k for k, v in BOTTLENECK_LOCATIONS[id(layout.spec)].items()}
    refuse_decoder_gating(ah, layout, weights_file)
    ln_before, ln_after = bool(ah.get("ln_before")), bool(ah.get("ln_after"))
    sites: dict[str, dict[str, torch.Tensor]] = {}
    origins: dict[str, str] = {}
    for key, path, param, value in _keys(tensors, rf"(.+)\.adapters\.{re.escape(name)}\.(.+)", weights_file):
        place = place_of(layout, path, f"'{weights_file}', key '{key}'")
        layer, location = place.split(".", 2)[1], place.split(".", 2)[2]
        mine = _bottleneck_param(param, ln_before)
        if location not in where_is or mine is None:
            raise CheckpointError(f"'{weights_file}': key '{key}' is not a bottleneck parameter adapterkit knows.")
        if mine.startswith("gate.") and not ah.get("use_gating"):
            raise CheckpointError(f"'{weights_file}': key '{key}' is a gate, but the config says use_gating=false; the "
                                  "file was edited or belongs to another adapter.")
        sites.setdefault(f"layers.{layer}.{where_is[location]}", {})[mine] = value
        origins[f"layers.{layer}.{where_is[location]}"] = f"{path}.adapters.{name}"
    rf = ah.get("reduction_factor", 16)
    if isinstance(rf, dict):
        values = {rf.get(str(i), rf.get("default")) for i in range(layout.num_layers)}
        if len(values) != 1:
            raise CheckpointError(f"'{weights_file.parent / CONFIG}': reduction_factor {rf} differs between layers; "
                                  "adapterkit uses one bottleneck width per adapter.")
        rf = values.pop()
    if ln_before and ln_after:
        raise CheckpointError(f"'{weights_file.parent / CONFIG}': ln_before and ln_after are both set; adapterkit's "
                              "bottleneck has one extra layer norm (norm_position 'pre' or 'post').")
    activation = str(ah.get("non_linearity", "relu")).lower()
    options = dict(
        mh_adapter=bool(ah.get("mh_adapter")), output_adapter=bool(ah.get("output_adapter")), reduction_factor=rf,
        non_linearity=ACTIVATIONS.get(activation, activation), dropout=float(ah.get("dropout") or 0.0),
        norm_position="pre" if ln_before else ("post" if ln_after else None),
        original_ln_before=bool(ah.get("original_ln_before")),
        original_ln_after=bool(ah.get("original_ln_after", True)),
        residual_before_ln=ah.get("residual_before_ln", True),
        adapter_residual_before_ln=bool(ah.get("adapter_residual_before_ln")), is_parallel=bool(ah.get("is_parallel")),
        scaling=ah.get("scaling", 1.0), leave_out=tuple(ah.get("leave_out") or ()),
        stochastic_depth=float(ah.get("stochastic_depth") or 0.0),
        init_weights=ah.get("init_weights") if ah.get("init_weights") in INITS else "mam_adapter",
        use_gating=bool(ah.get("use_gating")),
    )
    return _config(BottleneckConfig, options, weights_file), sites, origins


def _read_weight_method(ah: dict, tensors: dict, name: str, model, weights_file: Path, ia3: bool):
    layout = model.layout
    gated = bool(ah.get("use_gating"))
    if gated and (ia3 or ah.get("use_dora")):
        raise CheckpointError(f"'{weights_file.parent / CONFIG}': use_gating with {'IA3' if ia3 else 'DoRA'} has no "
                              "adapterkit counterpart (gated LoRA has); only adapters without it can be loaded.")
    refuse_decoder_gating(ah, layout, weights_file)
    sites: dict[str, dict[str, torch.Tensor]] = {}
    origins: dict[str, str] = {}
    for key, path, param, value in _keys(tensors, rf"(.+)\.loras\.{re.escape(name)}\.(lora_A|lora_B|m\.weight|"
                                         r"gate\.weight|gate\.bias)", weights_file):
        place = place_of(layout, path, f"'{weights_file}', key '{key}'")
        module_at(layout, place, f"'{weights_file}', key '{key}'")
        if layout.spec is not None and place.endswith("." + SLICED.get(id(layout.spec), "-")):
            raise CheckpointError(f"'{weights_file}': key '{key}': AdapterHub adapts slices of {layout.model_type}'s "
                                  "fused projection (LoRAMergedLinear), which adapterkit's LoRA / IA3 (on the whole "
                                  "module) cannot express; adapters on it are not supported.")
        if ia3:
            if param != "lora_B":
                raise CheckpointError(f"'{weights_file}': unexpected key '{key}': AdapterHub IA3 holds lora_B only.")
            value = value.reshape(-1) * float(ah.get("alpha", 1))
            param = "ia3_l"
        elif param == "m.weight":  # DoRA's magnitude, an nn.Linear(1, out) there
            value, param = value.reshape(-1), "lora_magnitude_vector"
        sites.setdefault(place, {})[param] = value
        origins[place] = f"{path}.loras.{name}"
    options = placement(layout, list(sites), f"'{weights_file}'")
    if ia3:
        return _config(IA3Config, options, weights_file), sites, origins
    dora = bool(ah.get("use_dora"))
    needed = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if dora else set()) | \
        ({"gate.weight", "gate.bias"} if gated else set())
    for place, params in sites.items():
        if set(params) != needed:
            raise CheckpointError(f"'{weights_file}': the {'DoRA' if dora else 'LoRA'} of '{place}' has {sorted(params)} "
                                  f"but needs {sorted(needed)}; the file is incomplete.")
    options.update(r=int(ah.get("r", 8)), alpha=float(ah.get("alpha", 8)), dropout=float(ah.get("dropout") or 0.0))
    if gated:
        options["use_gating"] = True
    if dora:  # AdapterHub's DoRA: the norm of W + B A (no scaling), the factor on the bias too
        return _config(DoRAConfig, {**options, "norm_with_scaling": False, "rescale_bias": True}, weights_file), \
            sites, origins
    return _config(LoRAConfig, options, weights_file), sites, origins


def refuse_decoder_gating(ah: dict, layout, weights_file: Path) -> None:
    """AdapterHub's gate averages over a call's tokens; on a decoder adapterkit's is per token
    (``methods/gating.py``), so an AdapterHub gated adapter would compute something else there."""
    if ah.get("use_gating") and layout.is_decoder:
        raise CheckpointError(f"'{weights_file.parent / CONFIG}': use_gating on a decoder ({layout.model_type}): "
                              "AdapterHub's gate averages over the tokens of a call, adapterkit's is per token there "
                              "(causal, so generation with a KV cache equals recomputing); the logits would differ, so "
                              "the adapter is not loaded.")


def _config(cls: type[AdapterConfig], options: dict, weights_file: Path) -> AdapterConfig:
    try:
        return cls(**options)
    except AdapterError as err:
        raise CheckpointError(f"'{weights_file.parent / CONFIG}': {err}") from None


def _read_head(folder: Path, model, allow_pickle: bool):
    """``(head, tensors, why skipped)``: a flexible head (``config`` object), or a static one
    (``config: null`` + ``model_class``, ``static_heads.py``) built or skipped with the reason."""
    if not (folder / HEAD_CONFIG).is_file():
        return None, {}, None
    head_file = folder / HEAD_CONFIG
    data = read_json(head_file)
    cfg = data.get("config") or {}
    layout = model.layout
    tensors, weights_file = read_weights(folder, HEAD_WEIGHTS, HEAD_PICKLED, allow_pickle=allow_pickle)
    if data.get("config") is None and data.get("model_class"):
        return read_static_head(data, tensors, layout, head_file)
    head_type = cfg.get("head_type")
    types = {"classification": "classification", "multilabel_classification": "classification", "tagging": "tagging"}
    alone = "the adapter was loaded without it: add a head and train it"
    if head_type not in types:
        return None, {}, (f"'{head_file}': head_type {head_type!r} has no adapterkit counterpart (classification, "
                          f"multilabel_classification, tagging); {alone}")
    layers = int(cfg.get("layers", 1))
    if layers > 1 and cfg.get("activation_function", "tanh") != "tanh":
        return None, {}, (f"'{head_file}': the head's activation_function is {cfg['activation_function']!r}, but "
                          f"adapterkit heads use tanh between layers; {alone}")
    name = str(data.get("name"))
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"heads\.{re.escape(name)}\.(\d+)\.(weight|bias)", key)
        if not m or (int(m.group(1)) - 1) % 3:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}' for head '{name}'.")
        found.setdefault((int(m.group(1)) - 1) // 3, {})[m.group(2)] = value
    if sorted(found) != list(range(layers)):
        raise CheckpointError(f"'{weights_file}': head '{name}' needs {layers} linear layers but has weights for "
                              f"{sorted(found)}; the file is incomplete.")
    for j, layer in found.items():
        for param in ("weight", "bias") if cfg.get("bias", True) else ("weight",):
            if param not in layer:
                raise CheckpointError(f"'{weights_file}': 'heads.{name}.{H.linear_index(j)}.{param}' is missing; the "
                                      "file is incomplete.")
    stack = [found[j] for j in range(layers)]
    if cfg.get("use_pooler"):  # the base model's pooler (dense + tanh) comes first
        stack.insert(0, H.base_module_weights(layout, "pooler.dense", f"'{head_file}'"))
    num_labels = int(cfg.get("num_labels", stack[-1]["weight"].shape[0]))
    mine = types[head_type]
    if mine == "classification" and num_labels == 1:
        mine = "regression"
    pooling = "auto" if mine == "tagging" else ("last" if layout.is_decoder else "cls")
    id2label = {int(v): str(k) for k, v in (cfg.get("label2id") or {}).items()}
    head = HeadConfig(mine, num_labels, layers=len(stack), pooling=pooling,
                      multilabel=head_type == "multilabel_classification", id2label=id2label)
    return head, H.head_layers(stack), None


# -- writing -------------------------------------------------------------------------------------------
def write(directory: "str | Path", meta: dict[str, Any], tensors: dict[str, torch.Tensor], model) -> Path:
    """Write adapterkit's in-memory checkpoint as an AdapterHub folder (``model.load_adapter(folder)``)."""
    config = config_from_dict(meta["config"])
    layout = model.layout
    if config.method not in WRITERS:
        raise AdapterError(f"adapterkit does not write {config.method} adapters in AdapterHub's format (it writes "
                           f"{', '.join(sorted(WRITERS))}); nothing was written. Save it with format='adapterkit'"
                           f"{' or format=' + repr('peft') if config.method in ('prefix_tuning', 'prompt_tuning') else ''}.")
    if layout.spec is None or id(layout.spec) not in BOTTLENECK_LOCATIONS:
        raise AdapterError(f"adapterkit writes AdapterHub adapters for BERT, RoBERTa, DistilBERT, GPT-2 and "
                           f"Llama-family models, not {layout.model_type}; nothing was written.")
    name = meta["name"]
    ah_config, out = WRITERS[config.method](config, by_place(meta, tensors), name, layout)
    model_class = type(layout.model).__name__
    if meta.get("head"):
        model_class = FLEX_CLASSES.get(layout.model_type, model_class)
    info = {"hidden_size": layout.hidden_size, "model_type": layout.model_type, "model_class": model_class,
            "model_name": getattr(getattr(layout.model, "config", None), "_name_or_path", "") or "", "name": name,
            "version": VERSION}
    json_files = {CONFIG: {**info, "config": ah_config}}
    tensor_files = {WEIGHTS: out}
    if meta.get("head"):
        json_files[HEAD_CONFIG], tensor_files[HEAD_WEIGHTS] = _write_head(meta["head"], head_tensors(tensors), name,
                                                                         info, layout)
    return write_folder(directory, json_files, tensor_files, FILES)


def _layers_and_paths(sites: dict, layout) -> tuple[list[int], dict[str, list[str]]]:
    by_rest: dict[str, list[int]] = {}
    for place in sites:
        _, layer, rest = place.split(".", 2)
        by_rest.setdefault(rest, []).append(int(layer))
    layer_sets = {tuple(sorted(v)) for v in by_rest.values()}
    if len(layer_sets) != 1:
        raise AdapterError("AdapterHub places one set of modules in every chosen layer; this adapter's modules differ "
                           "between layers. Nothing was written.")
    return list(layer_sets.pop()), by_rest


def _leave_out(layers: list[int], layout) -> list[int]:
    return [i for i in range(layout.num_layers) if i not in layers]


def _write_bottleneck(config: BottleneckConfig, sites: dict, name: str, layout):
    refuse_options(config, {"mh_adapter", "output_adapter", "reduction_factor", "bottleneck_dim", "non_linearity",
                            "dropout", "norm_position", "original_ln_before", "original_ln_after", "residual_before_ln",
                            "adapter_residual_before_ln", "is_parallel", "scaling", "init_weights", "layers",
                            "leave_out", "stochastic_depth", "use_gating"}, "AdapterHub")
    refuse_decoder_gating_export(config, layout)
    layers, by_rest = _layers_and_paths(sites, layout)
    locations = BOTTLENECK_LOCATIONS[id(layout.spec)]
    rf = config.reduction_factor
    if config.bottleneck_dim is not None:
        rf = layout.hidden_size / config.bottleneck_dim
        if int(layout.hidden_size // rf) != config.bottleneck_dim:
            raise AdapterError(f"AdapterHub sets the bottleneck width as hidden_size // reduction_factor, which cannot "
                               f"give bottleneck_dim={config.bottleneck_dim}; nothing was written.")
    shift = 1 if config.norm_position == "pre" else 0
    names = {"norm_before": ["adapter_norm_before", "adapter_down.0"], "down": [f"adapter_down.{shift}"],
             "up": ["adapter_up"], "norm_after": ["adapter_norm_after"], "scaling": ["scaling"], "gate": ["gate"]}
    out = {}
    for place, params in sites.items():
        _, layer, where = place.split(".", 2)
        prefix = f"{peer_path(layout, f'layers.{layer}.{locations[where]}', with_prefix=False)}.adapters.{name}"
        for param, value in params.items():
            module, _, leaf = param.rpartition(".")
            for ah_name in names[module or param]:
                out[f"{prefix}.{ah_name}.{leaf}" if module else f"{prefix}.{ah_name}"] = value
    ah = {"mh_adapter": config.mh_adapter, "output_adapter": config.output_adapter,
          "reduction_factor": rf, "non_linearity": config.non_linearity,
          "original_ln_before": config.original_ln_before,
          "original_ln_after": config.original_ln_after, "residual_before_ln": config.residual_before_ln,
          "adapter_residual_before_ln": config.adapter_residual_before_ln, "ln_before": config.norm_position == "pre",
          "ln_after": config.norm_position == "post", "init_weights": "bert" if config.init_weights == "mam_adapter"
          else config.init_weights, "is_parallel": config.is_parallel, "scaling": config.scaling,
          "use_gating": config.use_gating, "phm_layer": False, "dropout": config.dropout,
          "stochastic_depth": config.stochastic_depth,
          "leave_out": _leave_out(layers, layout), "inv_adapter": None, "cross_adapter": False}
    return ah, out


def _write_weight_method(config, sites: dict, name: str, layout, ia3: bool):
    if not ia3:
        config, sites = as_plain_lora(config, sites)  # PiSSA / OLoRA: the rank-2r LoRA on the unmodified base
    handled = {"roles", "target_modules", "layers", "leave_out"} | (set() if ia3 else {"r", "alpha", "dropout",
                                                                                         "use_rslora", "use_gating"})
    refuse_decoder_gating_export(config, layout)
    dora = config.method == "dora"
    if dora and (config.norm_with_scaling or not config.rescale_bias):
        raise AdapterError("AdapterHub's DoRA takes the norm of W + B A without the scaling and rescales the bias "
                           "(norm_with_scaling=False, rescale_bias=True); this DoRA adapter uses PEFT's formula; nothing "
                           "was written. Save it with format='peft' or 'adapterkit'.")
    refuse_options(config, handled | ({"norm_with_scaling", "rescale_bias"} if dora else set()), "AdapterHub")
    locations = lora_locations(sites, layout, "IA3" if ia3 else "LoRA")
    out = {}
    for place, params in sites.items():
        prefix = f"{peer_path(layout, place, with_prefix=False)}.loras.{name}"
        if ia3:
            out[f"{prefix}.lora_B"] = params["ia3_l"].reshape(-1, 1)
        else:
            out[f"{prefix}.lora_A"], out[f"{prefix}.lora_B"] = params["lora_A"], params["lora_B"]
        if dora:
            out[f"{prefix}.m.weight"] = params["lora_magnitude_vector"].reshape(-1, 1)
        for param in ("gate.weight", "gate.bias"):  # use_gating
            if param in params:
                out[f"{prefix}.{param}"] = params[param]
    ah = {"architecture": "lora", **locations, "use_gating": bool(getattr(config, "use_gating", False)),
          "use_dora": dora, "dtype": None}
    if ia3:
        ah.update(r=1, alpha=1, dropout=0.0, composition_mode="scale", init_weights="ia3")
    else:
        # AdapterHub scales by alpha / r; rsLoRA's alpha / sqrt(r) is the same with alpha * sqrt(r)
        alpha = config.alpha * math.sqrt(config.r) if config.use_rslora else config.alpha
        ah.update(r=config.r, alpha=alpha, dropout=config.dropout, composition_mode="add", init_weights="lora")
    return ah, out


def lora_locations(sites: dict, layout, what: str) -> dict[str, Any]:
    """AdapterHub's LoRA options (``selfattn_lora``, ``attn_matrices``, ``intermediate_lora``,
    ``output_lora``, ``leave_out``) that place a LoRA-like adapter on exactly ``sites``."""
    layers, by_rest = _layers_and_paths(sites, layout)
    linears = single_stack(layout).spec.linears
    roles = {path: role for role, path in linears.items()}
    table = LORA_LOCATIONS[id(layout.spec)]
    chosen = []
    for rest in by_rest:
        if roles.get(rest) not in table:
            raise AdapterError(f"AdapterHub's {what} cannot adapt '{rest}' of {layout.model_type} "
                               f"(it adapts {', '.join(linears[r] for r in table)}); nothing was written.")
        chosen.append(table[roles[rest]])
    attn = sorted(c for c in chosen if c in ("q", "k", "v"))
    return {"selfattn_lora": bool(attn), "attn_matrices": attn, "intermediate_lora": "intermediate" in chosen,
            "output_lora": "output" in chosen, "leave_out": _leave_out(layers, layout)}


def refuse_decoder_gating_export(config, layout) -> None:
    if getattr(config, "use_gating", False) and layout.is_decoder:
        raise AdapterError(f"AdapterHub's gate averages over the tokens of a call, adapterkit's on a decoder "
                           f"({layout.model_type}) is per token; AdapterHub would compute other logits, so nothing "
                           "was written. Save it with format='adapterkit'.")


def _write_head(head: dict, tensors: dict, name: str, info: dict, layout):
    cfg = HeadConfig.from_dict(head)
    pooling = H.resolved_pooling(cfg.pooling, layout)
    wanted = "last" if layout.is_decoder else "cls"
    if cfg.type != "tagging" and pooling != wanted:
        raise AdapterError(f"AdapterHub's heads on {layout.model_type} read the {wanted} token; this head pools with "
                           f"'{pooling}'. Nothing was written: save with with_head=False, or with format='adapterkit'.")
    head_type = {"classification": "multilabel_classification" if cfg.multilabel else "classification",
                 "regression": "classification", "tagging": "tagging"}[cfg.type]
    ah = {"head_type": head_type, "num_labels": cfg.num_labels, "layers": cfg.layers, "activation_function": "tanh",
          "label2id": {label: i for i, label in cfg.id2label.items()} or
                      {f"LABEL_{i}": i for i in range(cfg.num_labels)},
          "use_pooler": False, "bias": True, "dropout_prob": None}
    return {**info, "config": ah}, {f"heads.{name}.{k[len('mlp.'):]}": v for k, v in tensors.items()}


READERS = {"bottleneck": _read_bottleneck,
           "lora": lambda *a: _read_weight_method(*a, ia3=False),
           "ia3": lambda *a: _read_weight_method(*a, ia3=True)}
READERS["dora"] = READERS["lora"]
READ_OPTIONS = {"bottleneck": BN_READ, "lora": LORA_READ, "ia3": LORA_READ, "dora": LORA_READ | {"use_dora"}}
OFF_OPTIONS = {"bottleneck": BN_OFF, "lora": LORA_OFF, "ia3": LORA_OFF,
               "dora": {k: v for k, v in LORA_OFF.items() if k != "use_dora"}}
WRITERS = {"bottleneck": _write_bottleneck,
           "lora": lambda *a: _write_weight_method(*a, ia3=False),
           "ia3": lambda *a: _write_weight_method(*a, ia3=True)}
WRITERS["dora"] = WRITERS["lora"]
# ReFT (adapterhub_reft.py)
READERS["reft"], READ_OPTIONS["reft"], OFF_OPTIONS["reft"] = adapterhub_reft.read, adapterhub_reft.READ, {}
WRITERS["reft"] = adapterhub_reft.write
# Compacter (adapterhub_compacter.py): the bottleneck reader plus the shared rule
READERS["compacter"] = lambda *a: adapterhub_compacter.read(*a, bottleneck=_read_bottleneck)
READ_OPTIONS["compacter"] = BN_READ
OFF_OPTIONS["compacter"] = {k: v for k, v in BN_OFF.items() if k != "phm_layer"}
WRITERS["compacter"] = lambda *a: adapterhub_compacter.write(*a, bottleneck=_write_bottleneck)
# prefix tuning (adapterhub_prefix.py) and unions of LoRA, bottleneck and prefix parts (adapterhub_union.py: UniPELT)
READERS["prefix_tuning"], READ_OPTIONS["prefix_tuning"], OFF_OPTIONS["prefix_tuning"] = \
    adapterhub_prefix.read, adapterhub_prefix.READ, {}
WRITERS["prefix_tuning"] = adapterhub_prefix.write
# VeRA (adapterhub_vera.py): full (r, r) / (out, out) scaling matrices, the random matrices saved
READERS["vera"] = lambda *a: adapterhub_vera.read(*a, sliced=SLICED)
READ_OPTIONS["vera"], OFF_OPTIONS["vera"] = LORA_READ | {"vera_d", "vera_b"}, {"use_dora": False, "use_gating": False}
WRITERS["vera"] = lambda *a: adapterhub_vera.write(*a, locations=lora_locations)
READERS["union"] = lambda *a: adapterhub_union.read(*a, kind_of=_kind, read_part=from_adapterhub)
READ_OPTIONS["union"], OFF_OPTIONS["union"] = adapterhub_union.READ, {}
WRITERS["union"] = lambda *a: adapterhub_union.write(*a, writers=WRITERS)
