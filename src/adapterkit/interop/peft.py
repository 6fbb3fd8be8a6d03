"""Hugging Face PEFT adapters: ``adapter_config.json`` (with ``peft_type``) +
``adapter_model.safetensors`` (or, by opt-in, ``adapter_model.bin``).

PEFT names each tensor by the adapted module's path in the model it wrapped, with the adapter
name stripped: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (LoRA, A is
(r, in), B (out, r); on a convolution A is (r, in, *kernel), B (out, r, 1...)),
``.lora_embedding_A`` (r, num) / ``.lora_embedding_B`` (dim, r) on an ``nn.Embedding``, and ``base_model.model.<module path>.ia3_l`` ((out, 1), or (1, in) for a
``feedforward_modules`` entry, whose input is scaled). The sites are read from the tensors; the
config supplies ``lora_alpha`` (with ``alpha_pattern``), ``use_rslora`` and ``lora_dropout``.
``modules_to_save`` heads map onto an adapterkit ``Head`` where they are exactly one (``HEADS``).
``fan_in_fan_out`` needs nothing: adapterkit's LoRA / IA3 read GPT-2's ``Conv1D`` layout from the
module itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import config_from_dict
from ..errors import AdapterError, CheckpointError
from ..heads import HeadConfig
from ..layouts import linear_features
from ..methods.dora import DoRAConfig
from ..methods.ia3 import IA3Config
from ..methods.lora import EMBEDDINGS, LoRAConfig, pattern_value
from ..methods.lora_init import as_plain_lora
from ..methods.lora_layers import SlicedSite, host_kind
from . import heads as H
from . import peft_prefix, peft_prompt, peft_vera
from .files import read_json, read_weights, write_folder
from .meta import by_place, checkpoint, head_tensors, refuse_options
from .peft_targets import refuse_undeclared
from .places import is_conv1d, module_at, peer_path, per_site, place_of, place_regex, placement

CONFIG = "adapter_config.json"
WEIGHTS, PICKLED = "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
FILES = frozenset({CONFIG, WEIGHTS, PICKLED, "README.md"})  # what a PEFT save_pretrained leaves
#: config keys read here, and keys that only describe how PEFT built or initialised the adapter
READ = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
        "target_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "modules_to_save",
        "feedforward_modules", "bias", "use_dora"}
BOOKKEEPING = {"base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "init_ia3_weights",
               "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "exclude_modules",
               "ensure_weight_tying"}
NEUTRAL = (None, False, {}, [], "", "none")

BERT, ROBERTA = ("bert",), ("roberta", "xlm-roberta", "camembert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class PeftHead:
    """A ``transformers`` task head that is exactly an adapterkit ``Head``.

    ``modules`` are its Linear layers in order (``{prefix}`` = ``base_model_prefix``); those in
    ``from_base`` may be missing from the file and are then the base model's own."""

    task_type: str
    model_types: tuple[str, ...]
    head_types: tuple[str, ...]
    pooling: str
    modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    bias: bool = True
    from_base: tuple[str, ...] = ()


_SEQ = ("classification", "regression")
HEADS = (
    # BertForSequenceClassification: pooler (dense + tanh on [CLS], in the base) -> classifier
    PeftHead("SEQ_CLS", BERT, _SEQ, "cls", ("{prefix}.pooler.dense", "classifier"), ("classifier", "pooler"),
             from_base=("{prefix}.pooler.dense",)),
    # RobertaClassificationHead: dense + tanh -> out_proj, on <s>
    PeftHead("SEQ_CLS", ROBERTA, _SEQ, "cls", ("classifier.dense", "classifier.out_proj"), ("classifier",)),
    # GPT2 / Llama ForSequenceClassification: score (no bias) on the last non-padding token
    PeftHead("SEQ_CLS", DECODERS, _SEQ, "last", ("score",), ("score",), bias=False),
    PeftHead("TOKEN_CLS", BERT + ROBERTA, ("tagging",), "auto", ("classifier",), ("classifier",)),
)


# -- reading -------------------------------------------------------------------------------------------
def read(folder: Path, model, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT folder as adapterkit's in-memory checkpoint, for ``model`` (an ``AdapterModel``)."""
    config_file = folder / CONFIG
    cfg = read_json(config_file)
    peft_type = cfg.get("peft_type")
    if peft_type == "PROMPT_TUNING":
        return peft_prompt.read(folder, cfg, model, WEIGHTS, PICKLED, allow_pickle=allow_pickle)
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", folder.resolve().name) or "adapter"
    if peft_type == "PREFIX_TUNING":  # one tensor, not per module (peft_prefix.py)
        tensors, weights_file = read_weights(folder, WEIGHTS, PICKLED, allow_pickle=allow_pickle)
        return peft_prefix.read(cfg, tensors, model, weights_file, name)
    if peft_type == "VERA":  # shared matrices outside base_model.model (peft_vera.py)
        tensors, weights_file = read_weights(folder, WEIGHTS, PICKLED, allow_pickle=allow_pickle)
        saved = cfg.get("modules_to_save") or []
        heads = {k: v for k, v in tensors.items() if any(f".{m}." in f".{k[len(PREFIX):]}." for m in saved)}
        head, head_state = _read_head(cfg, heads, model, weights_file)
        rest = {k: v for k, v in tensors.items() if k not in heads}
        return peft_vera.read(cfg, rest, model, weights_file, name, PREFIX, NEUTRAL, BOOKKEEPING | {"modules_to_save"},
                              head, head_state)
    if peft_type not in METHODS:
        raise CheckpointError(f"'{config_file}': peft_type {peft_type!r} is not supported; adapterkit reads "
                              f"{', '.join(METHODS)}, VERA, PROMPT_TUNING and PREFIX_TUNING adapters.")
    for key, value in cfg.items():
        if key not in READ | BOOKKEEPING and value not in NEUTRAL:
            raise CheckpointError(f"'{config_file}': option '{key}' = {value!r} has no adapterkit counterpart; "
                                  "only adapters without it can be loaded.")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise CheckpointError(f"'{config_file}': init_lora_weights = {init!r}: this adapter needs the residual base "
                              "model PEFT made when it initialised it. Save it from PEFT with save_pretrained(..., "
                              "path_initial_model_for_weight_conversion=...) so it loads on the unmodified base.")
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(f"'{config_file}': option 'bias' = {cfg['bias']!r} trains the base model's biases, "
                              "which adapterkit adapters do not hold; only bias='none' can be loaded.")
    tensors, weights_file = read_weights(folder, WEIGHTS, PICKLED, allow_pickle=allow_pickle)
    adapter_keys, head_keys = {}, {}
    saved = cfg.get("modules_to_save") or []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"'{weights_file}': key '{key}' does not start with '{PREFIX}'; not a PEFT adapter.")
        path = key[len(PREFIX):]
        if METHODS[peft_type].key.fullmatch(path):
            adapter_keys[key] = value
        elif any(f".{m}." in f".{path}" for m in saved):
            head_keys[key] = value
        else:
            raise CheckpointError(f"'{weights_file}': unexpected key '{key}': neither {peft_type} weights nor a module "
                                  f"in modules_to_save {saved}; the file was edited or is not this adapter's.")
    if not adapter_keys:
        raise CheckpointError(f"'{weights_file}': no {peft_type} weights in it; the file is incomplete.")
    _check_declared(cfg, adapter_keys, config_file, weights_file)
    head, head_state = _read_head(cfg, head_keys, model, weights_file)
    config, weights, origins = METHODS[peft_type].read(cfg, adapter_keys, model, weights_file)
    return checkpoint(model, name, config, weights, head, head_state, f"'{weights_file}'", origins=origins)


def _check_declared(cfg: dict, tensors: dict[str, torch.Tensor], config_file: Path, weights_file: Path) -> None:
    """Refuse weights the config does not declare (``peft_targets``): PEFT itself would not apply
    them, so adapterkit's outputs would differ from PEFT's for the same folder."""
    sites: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        suffix = _SUFFIX.search(key).group(1)  # type: ignore[union-attr]
        site = sites.setdefault(_SUFFIX.sub("", key[len(PREFIX):]), {})
        if suffix in ("lora_A.weight", "lora_embedding_A"):
            site["rank"] = value.shape[0]
        elif suffix == "lora_magnitude_vector":  # DoRA: declared by use_dora on a targeted module
            site["magnitude"] = True
        elif suffix == "ia3_l":
            site["input"] = value.dim() == 2 and value.shape[0] == 1 and value.shape[1] != 1
    refuse_undeclared(cfg, sites, config_file, weights_file)


#: a LoRA tensor's name after its module path -> adapterkit's parameter name
_LORA_PARAMS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
                "lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B",
                "lora_magnitude_vector": "lora_magnitude_vector"}  # DoRA (use_dora): (out,)
_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
                     r"|ia3_l)$")


def _site(model, key: str, weights_file: Path) -> tuple[str, str, Any]:
    """``(place id, module path in the file, module)`` of one tensor."""
    path = _SUFFIX.sub("", key[len(PREFIX):])
    where = f"'{weights_file}', key '{key}'"
    place = place_of(model.layout, path, where)
    return place, path, module_at(model.layout, place, where)


def _check_shape(value: torch.Tensor, shape: tuple[int, ...], key: str, weights_file: Path) -> None:
    if tuple(value.shape) != shape:
        raise CheckpointError(f"'{weights_file}': '{key}' has shape {tuple(value.shape)}, but this model needs "
                              f"{shape} there (another hidden size?); load it into the base model it was trained on.")


def _read_lora(cfg: dict, tensors: dict, model, weights_file: Path):
    sites: dict[str, dict[str, torch.Tensor]] = {}
    paths: dict[str, str] = {}
    hosts: dict[str, Any] = {}
    for key, value in tensors.items():
        place, paths_place, hosts_place = _site(model, key, weights_file)
        paths[place], hosts[place] = paths_place, hosts_place
        sites.setdefault(place, {})[_LORA_PARAMS[_SUFFIX.search(key).group(1)]] = value
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    ranks, alphas = {}, {}
    for place, params in sites.items():
        pair = ({"lora_embedding_A", "lora_embedding_B"} if "lora_embedding_A" in params or "lora_embedding_B" in params
                else {"lora_A", "lora_B"})
        pair = pair | ({"lora_magnitude_vector"} if cfg.get("use_dora") else set())
        if cfg.get("use_dora") and "lora_magnitude_vector" not in params:
            raise CheckpointError(f"'{weights_file}': '{weights_file.parent / CONFIG}' says use_dora=true but "
                                  f"'{PREFIX}{paths[place]}' has no lora_magnitude_vector; the file is incomplete or the "
                                  "config was edited.")
        if set(params) != pair:
            raise CheckpointError(f"'{weights_file}': '{PREFIX}{paths[place]}' has {sorted(params)} but LoRA needs "
                                  f"both of {sorted(pair)}; the file is incomplete.")
        if host_kind(hosts[place]) is None:
            raise CheckpointError(f"'{weights_file}': '{PREFIX}{paths[place]}' is a {type(hosts[place]).__name__} in "
                                  "this model, not a layer adapterkit's LoRA adapts.")
        feats = linear_features(hosts[place])
        r = params[min(pair)].shape[0]
        if feats is not None:  # other hosts' shapes are checked against their modules (meta.checkpoint)
            _check_shape(params["lora_A"], (r, feats[0]), f"{PREFIX}{paths[place]}.lora_A.weight", weights_file)
            _check_shape(params["lora_B"], (feats[1], r), f"{PREFIX}{paths[place]}.lora_B.weight", weights_file)
        ranks[place] = r
        alphas[place] = float(pattern_value(cfg.get("alpha_pattern"), paths[place], alpha0))
    embeddings = _as_embeddings_role(model.layout, list(sites), f"'{weights_file}'")
    if embeddings is not None:
        old, options = embeddings
        for table in (sites, paths, ranks, alphas):
            table[EMBEDDINGS] = table.pop(old)
    else:
        options = placement(model.layout, list(sites), f"'{weights_file}'")
    try:
        config = (DoRAConfig if cfg.get("use_dora") else LoRAConfig)(r=r0, alpha=alpha0, dropout=float(cfg.get("lora_dropout") or 0.0),
                            use_rslora=bool(cfg.get("use_rslora")), rank_pattern=per_site(ranks, r0, list(sites)),
                            alpha_pattern=per_site(alphas, alpha0, list(sites)), **options)
    except AdapterError as err:
        raise CheckpointError(f"'{weights_file.parent / CONFIG}': {err}") from None
    return config, sites, {p: PREFIX + path for p, path in paths.items()}


def _as_embeddings_role(layout, places: list[str], where: str) -> Optional[tuple[str, dict[str, Any]]]:
    """Where a PEFT adapter adapts the model's input token embeddings and its other modules are
    layout roles: ``(the embeddings' place id, options with the role "embeddings")``, else None."""
    names = {id(m): n for n, m in layout.model.named_modules()}
    module = layout.embeddings
    place = layout.place_id_for(names[id(module)]) if module is not None and id(module) in names else None
    if place is None or place not in places:
        return None
    rest = [p for p in places if p != place]
    options = placement(layout, rest, where) if rest else {"layers": None, "roles": []}
    if "roles" not in options:
        return None
    return place, {**options, "roles": [*options["roles"], EMBEDDINGS]}


def _read_ia3(cfg: dict, tensors: dict, model, weights_file: Path):
    sites, inputs, origins = {}, [], {}
    for key, value in tensors.items():
        place, _, host = _site(model, key, weights_file)
        feats = linear_features(host)
        origins[place] = key
        if feats is None:
            raise CheckpointError(f"'{weights_file}': '{key}' is not on a Linear layer in this model.")
        scales_input = tuple(value.shape) == (1, feats[0]) and tuple(value.shape) != (feats[1], 1)
        _check_shape(value, (1, feats[0]) if scales_input else (feats[1], 1), key, weights_file)
        if scales_input:
            inputs.append(place)
        sites[place] = {"ia3_l": value.reshape(-1)}
    options = placement(model.layout, list(sites), f"'{weights_file}'")
    config = IA3Config(input_modules=place_regex(inputs, list(sites)) if inputs else None, **options)
    return config, sites, origins


def _read_head(cfg: dict, tensors: dict, model, weights_file: Path):
    if not tensors:
        return None, {}
    layout = model.layout
    prefix = getattr(layout.model, "base_model_prefix", "")
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem, param = key[len(PREFIX):].rsplit(".", 1)
        stems.setdefault(stem, {})[param] = value
    for spec in HEADS:
        modules = [m.format(prefix=prefix) for m in spec.modules]
        optional = {m.format(prefix=prefix) for m in spec.from_base}
        if (cfg.get("task_type") == spec.task_type and layout.model_type in spec.model_types
                and set(stems) <= set(modules) and set(modules) - optional <= set(stems)):
            break
    else:
        raise CheckpointError(f"'{weights_file}': the saved modules {sorted(stems)} (modules_to_save, task_type "
                              f"{cfg.get('task_type')!r}) are not a head adapterkit has on {layout.model_type}; "
                              "load the adapter without them, or keep it in PEFT.")
    where = f"'{weights_file}'"
    layers = [stems.get(m) or H.base_module_weights(layout, m.split(".", 1)[-1], where) for m in modules]
    num_labels = layers[-1]["weight"].shape[0]
    head_type = spec.head_types[0] if num_labels > 1 or len(spec.head_types) == 1 else spec.head_types[-1]
    head = HeadConfig(head_type, num_labels, layers=len(layers), pooling=spec.pooling)
    return head, H.head_layers(layers)


# -- writing -------------------------------------------------------------------------------------------
def write(directory: "str | Path", meta: dict[str, Any], tensors: dict[str, torch.Tensor], model) -> Path:
    """Write adapterkit's in-memory checkpoint as a PEFT folder loadable by ``PeftModel.from_pretrained``."""
    config = config_from_dict(meta["config"])
    if config.method == "prompt_tuning":
        return peft_prompt.write(directory, meta, tensors, model, CONFIG, WEIGHTS, FILES)
    base_name = getattr(getattr(model.layout.model, "config", None), "_name_or_path", None) or None
    if config.method == "prefix_tuning":  # one tensor, not per module (peft_prefix.py)
        if meta.get("head"):
            raise AdapterError("PEFT prefix tuning is written without a head here; nothing was written. Save with "
                               "with_head=False.")
        peft_cfg, out = peft_prefix.write(config, by_place(meta, tensors), model)
        peft_cfg.update({"inference_mode": True, "base_model_name_or_path": base_name})
        return write_folder(directory, {CONFIG: peft_cfg}, {WEIGHTS: out}, FILES)
    if config.method not in WRITERS:
        raise AdapterError(f"PEFT has no {config.method} adapter; nothing was written. Save it with "
                           "format='adapterkit' or 'adapterhub'.")
    layout = model.layout
    head_spec, head_out = _write_head(meta.get("head"), head_tensors(tensors), layout)
    task_type = head_spec.task_type if head_spec else ("CAUSAL_LM" if layout.is_decoder else None)
    with_prefix = task_type is not None
    sites = by_place(meta, tensors)
    paths = {p: peer_path(layout, p, with_prefix) for p in sites}
    hosts = {p: module_at(layout, p, "the adapter") for p in sites}
    if any(isinstance(s, SlicedSite) for s in config.sites(layout)):
        raise AdapterError("PEFT's LoRA has no slices of a fused projection (GPT-2's q / v of c_attn, loralib's "
                           "MergedLinear); nothing was written. Use roles=['qkv'] for a PEFT-compatible adapter, "
                           "or keep format='adapterkit'.")
    peft_cfg, out = WRITERS[config.method](config, sites, paths, hosts)
    out.update(head_out)
    peft_cfg.update({
        "task_type": task_type, "target_modules": sorted(paths.values()), "bias": "none", "inference_mode": True,
        "fan_in_fan_out": any(is_conv1d(h) for h in hosts.values()),
        "modules_to_save": list(head_spec.modules_to_save) if head_spec else None,
        "base_model_name_or_path": base_name,
    })
    return write_folder(directory, {CONFIG: peft_cfg}, {WEIGHTS: out}, FILES)


def _write_lora(config: LoRAConfig, sites, paths, hosts):
    config, sites = as_plain_lora(config, sites)  # PiSSA / OLoRA: the rank-2r LoRA on the unmodified base
    refuse_options(config, {"r", "alpha", "dropout", "roles", "target_modules", "layers", "leave_out", "use_rslora",
                            "rank_pattern", "alpha_pattern"}, "PEFT")
    out, ranks, alphas = {}, {}, {}
    for place, params in sites.items():
        site_cfg = config.for_site(place)
        if site_cfg.r != config.r:
            ranks[re.escape(paths[place])] = site_cfg.r
        if site_cfg.alpha != config.alpha:
            alphas[re.escape(paths[place])] = site_cfg.alpha
        names = {v: k for k, v in _LORA_PARAMS.items()}
        for param, value in params.items():
            out[f"{PREFIX}{paths[place]}.{names[param]}"] = value
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora, "rank_pattern": ranks, "alpha_pattern": alphas,
            "init_lora_weights": True, "use_dora": config.method == "dora"}, out


def _write_ia3(config: IA3Config, sites, paths, hosts):
    refuse_options(config, {"roles", "target_modules", "layers", "leave_out", "input_modules"}, "PEFT")
    out, feedforward = {}, []
    for place, params in sites.items():
        scale = params["ia3_l"]
        if config.scales_input(place):
            feedforward.append(paths[place])
            out[f"{PREFIX}{paths[place]}.ia3_l"] = scale.reshape(1, -1)
        else:
            out[f"{PREFIX}{paths[place]}.ia3_l"] = scale.reshape(-1, 1)
    return {"peft_type": "IA3", "feedforward_modules": sorted(feedforward), "init_ia3_weights": True}, out


def _write_head(head: Optional[dict], tensors: dict[str, torch.Tensor], layout):
    if not head:
        return None, {}
    cfg = HeadConfig.from_dict(head)
    pooling = H.resolved_pooling(cfg.pooling, layout)
    prefix = getattr(layout.model, "base_model_prefix", "")
    for spec in HEADS:
        if (layout.model_type in spec.model_types and cfg.type in spec.head_types and cfg.layers == len(spec.modules)
                and (spec.pooling == pooling or cfg.type == "tagging")):
            break
    else:
        raise AdapterError(f"PEFT has no {layout.model_type} task head like this one ({cfg.type}, layers={cfg.layers}, "
                           f"pooling={pooling}); nothing was written. Save with with_head=False, or with "
                           "format='adapterkit'.")
    out = {}
    for j, module in enumerate(spec.modules):
        w, b = tensors[f"mlp.{H.linear_index(j)}.weight"], tensors[f"mlp.{H.linear_index(j)}.bias"]
        name = module.format(prefix=prefix)
        out[f"{PREFIX}{name}.weight"] = w
        if spec.bias:
            out[f"{PREFIX}{name}.bias"] = b
        elif b.abs().max() > 0:
            raise AdapterError(f"The head's last layer has a bias, which {layout.model_type}'s '{name}' lacks; nothing "
                               "was written. Save with with_head=False, or with format='adapterkit'.")
    return spec, out


@dataclass(frozen=True)
class _Method:
    key: "re.Pattern[str]"  # a tensor name (after base_model.model.) of this method
    read: Any


METHODS = {"LORA": _Method(re.compile(r".+\.(lora_[AB]\.weight|lora_embedding_[AB]|lora_magnitude_vector)"),
                           _read_lora),
           "IA3": _Method(re.compile(r".+\.ia3_l"), _read_ia3)}
WRITERS = {"lora": _write_lora, "dora": _write_lora, "ia3": _write_ia3,
           "vera": lambda config, sites, paths, hosts: peft_vera.write(config, sites, paths, hosts, PREFIX)}
