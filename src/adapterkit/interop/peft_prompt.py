"""PEFT prompt tuning (``peft_type: "PROMPT_TUNING"``): one tensor, ``prompt_embeddings``
``(num_virtual_tokens, token_dim)``, with no module path, and the PEFT options
``num_virtual_tokens``, ``token_dim``, ``prompt_tuning_init`` (``RANDOM`` / ``SAMPLE_VOCAB`` /
``TEXT``), ``prompt_tuning_init_text`` and ``tokenizer_name_or_path``.

PEFT prepends the prompt to the embedded input as adapterkit does (mask of ones in front,
default positions), but returns its outputs at ``P + T`` positions: adapterkit's equal PEFT's
after their first ``P`` (tested against PEFT itself). Models PEFT runs with
``num_transformer_submodules=2`` (encoder-decoders) and PEFT task heads (which read the first
virtual token) have no adapterkit counterpart and are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import config_from_dict
from ..errors import AdapterError, CheckpointError
from ..methods.prompt_tuning import PromptTuningConfig
from ..places.input import input_site
from .files import read_weights, write_folder
from .meta import checkpoint, refuse_options

KEY = "prompt_embeddings"
#: PEFT's ``prompt_tuning_init`` <-> adapterkit's ``prompt_init``
INITS = {"RANDOM": "random_uniform", "SAMPLE_VOCAB": "from_vocab", "TEXT": "from_string"}
TASKS = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")
#: PEFT keys that describe the base model or how PEFT built the prompt, not the prompt itself
KNOWN = {"peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
         "num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
         "tokenizer_name_or_path", "tokenizer_kwargs", "base_model_name_or_path", "revision", "inference_mode",
         "peft_version", "auto_mapping", "modules_to_save"}


def read(folder: Path, cfg: dict[str, Any], model, weights: str, pickled: str, *, allow_pickle: bool = False):
    """A PEFT prompt-tuning folder as adapterkit's in-memory checkpoint for ``model``."""
    config_file = folder / "adapter_config.json"
    odd = sorted(k for k in cfg if k not in KNOWN)
    if odd:
        raise CheckpointError(f"'{config_file}': option(s) {odd} have no adapterkit counterpart for prompt tuning.")
    if cfg.get("task_type") not in TASKS or cfg.get("modules_to_save"):
        raise CheckpointError(f"'{config_file}': task_type {cfg.get('task_type')!r} with its PEFT head reads the first "
                              "virtual token, which adapterkit's heads never see; only CAUSAL_LM and "
                              "FEATURE_EXTRACTION prompts (no modules_to_save) can be loaded.")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"'{config_file}': num_transformer_submodules={cfg['num_transformer_submodules']} "
                              "(PEFT's encoder-decoder prompts) has no adapterkit counterpart; only one prompt for "
                              "the input can be loaded.")
    tensors, weights_file = read_weights(folder, weights, pickled, allow_pickle=allow_pickle)
    if set(tensors) != {KEY}:
        raise CheckpointError(f"'{weights_file}': a PEFT prompt holds exactly '{KEY}', not {sorted(tensors)}.")
    prompt = tensors[KEY]
    length = int(cfg.get("num_virtual_tokens") or prompt.shape[0])
    init = INITS.get(cfg.get("prompt_tuning_init") or "RANDOM", "random_uniform")
    try:
        config = PromptTuningConfig(prompt_length=length, prompt_init=init,
                                    prompt_init_text=cfg.get("prompt_tuning_init_text") if init == "from_string" else None,
                                    tokenizer_name_or_path=cfg.get("tokenizer_name_or_path") or None)
    except AdapterError as err:
        raise CheckpointError(f"'{config_file}': {err}") from None
    place = input_site(model.layout).place_id
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", folder.resolve().name) or "adapter"
    return checkpoint(model, name, config, {place: {"prompt_embedding.weight": prompt}},
                      None, {}, f"'{weights_file}'", origins={place: KEY})


def write(directory: "str | Path", meta: dict[str, Any], tensors: dict[str, torch.Tensor], model, config_name: str,
          weights: str, files: frozenset) -> Path:
    """adapterkit's prompt as a PEFT folder (``PeftModel.from_pretrained`` loads it)."""
    config = config_from_dict(meta["config"])
    refuse_options(config, {"prompt_length", "prompt_init", "prompt_init_text", "tokenizer_name_or_path"}, "PEFT")
    if meta.get("head"):
        raise AdapterError("A PEFT prompt-tuning head reads the first virtual token, which adapterkit's heads never "
                           "see; nothing was written. Save with with_head=False.")
    layout = model.layout
    site = input_site(layout)
    if site.input_host.spec.consumer is not None or not site.input_host.spec.embeddings:
        raise AdapterError(f"PEFT runs prompts on {layout.model_type} otherwise (encoder-decoders: two prompts; speech: "
                           "none); nothing was written. Keep the adapter in adapterkit's format.")
    prompt = tensors[f"adapter.{site.key}.prompt_embedding.weight"]
    text = config.prompt_init == "from_string"
    base = getattr(layout.model, "config", None)
    peft_cfg = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM" if layout.is_decoder else "FEATURE_EXTRACTION",
        "num_virtual_tokens": config.prompt_length, "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1, "num_attention_heads": getattr(base, "num_attention_heads", None),
        "num_layers": layout.num_layers,
        "prompt_tuning_init": {v: k for k, v in INITS.items()}[config.prompt_init],
        "prompt_tuning_init_text": config.prompt_init_text if text else None,
        "tokenizer_name_or_path": (config.tokenizer_name_or_path or getattr(base, "_name_or_path", None)) if text
        else None,
        "inference_mode": True, "base_model_name_or_path": getattr(base, "_name_or_path", None) or None,
    }
    return write_folder(directory, {config_name: peft_cfg}, {weights: {KEY: prompt.contiguous()}}, files)
