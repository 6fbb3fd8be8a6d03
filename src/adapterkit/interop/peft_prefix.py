"""PEFT prefix tuning (``peft_type: PREFIX_TUNING``) <-> adapterkit's ``prefix_tuning``.

PEFT saves ``prompt_embeddings``: the prefixes after its projection, ``(num_virtual_tokens,
num_layers * 2 * token_dim)``, read as ``(P, layers, key / value, kv_heads, head_dim)``
(``PeftModel.get_prompt``; ``token_dim = kv_heads * head_dim`` under grouped-query attention). That
is exactly a folded adapterkit prefix, ``(layers, 2, P, token_dim)``, so the two convert by a
permutation; the loaded adapter is ``flat`` (PEFT's projection is not in the file either).

PEFT hands its prefixes to the model as ``past_key_values``, so the real tokens' positions start
after them, at ``P``; adapterkit's prefixes take no positions and the tokens start at 0. With
rotary position embeddings (the Llama family) the two are one function up to a rotation of the
prefix keys: a query at ``P + i`` meets an unrotated key ``k`` as ``(R_{P+i} q) . k =
(R_i q) . (R_{-P} k)``, and scores between real tokens depend on ``i - j`` only. So reading
rotates PEFT's keys by ``-P`` with the model's own rotary embedding, writing by ``+P``; values
are copied. Models with absolute positions (GPT-2) or T5's relative bias have no such identity,
and encoder-decoders get PEFT's one prefix in both the decoder's self- and cross-attention:
those are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterError, CheckpointError
from ..methods.prefix_tuning import PrefixTuningConfig
from .meta import checkpoint, refuse_options

KEY = "prompt_embeddings"
#: layout families whose attention sees relative positions only, so PEFT's past-key-value
#: prefixes and adapterkit's position-free ones are the same function
RELATIVE_POSITIONS = ("llama",)
#: adapterkit options a PEFT prefix can express (the MLP's shape does not reach the file)
HANDLED = {"prefix_length", "bottleneck_size", "non_linearity", "flat", "encoder_prefix", "cross_prefix"}


def _check_model(layout: Any, where: str) -> None:
    if layout.spec is None or layout.spec.name not in RELATIVE_POSITIONS:
        raise AdapterError(
            f"{where}: PEFT prefix tuning passes its prefixes as past key values, which shifts the tokens' positions "
            f"on this {layout.model_type} model; adapterkit converts it for rotary decoders only "
            f"({', '.join(RELATIVE_POSITIONS)} family), where both compute the same function. Keep it in PEFT."
        )


def _rotate_keys(prefix: torch.Tensor, model: Any, sign: int) -> torch.Tensor:
    """``prefix`` ``(layers, 2, P, kv_heads * head_dim)`` with its keys rotated by ``sign * P``
    positions (the model's rotary embedding, its ``rotate_half``), values unchanged."""
    rotary = next(m for m in model.layout.model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    rotate_half = sys.modules[type(rotary).__module__].rotate_half
    layers, _, positions, width = prefix.shape
    _, head_dim = model.layout.attention_shape(next(iter(model.layout.stacks.values())))
    at = torch.tensor([[positions]], device=prefix.device)
    cos, sin = rotary(prefix.float(), at)
    scale = getattr(rotary, "attention_scaling", 1.0)
    cos, sin = cos.view(head_dim).float() / scale, sign * sin.view(head_dim).float() / scale
    keys = prefix[:, 0].float().reshape(layers, positions, width // head_dim, head_dim)
    keys = (keys * cos + rotate_half(keys) * sin).reshape(layers, positions, width).to(prefix.dtype)
    return torch.stack([keys, prefix[:, 1]], dim=1)


def read(cfg: dict, tensors: dict[str, torch.Tensor], model: Any, weights_file: Path, name: str):
    """A PEFT prefix-tuning folder's config and weights as adapterkit's in-memory checkpoint."""
    where = f"'{weights_file}'"
    try:
        _check_model(model.layout, where)
    except AdapterError as err:
        raise CheckpointError(str(err)) from None
    if set(tensors) != {KEY}:
        raise CheckpointError(f"{where}: a PEFT prefix-tuning file holds '{KEY}' only, not {sorted(tensors)[:4]}; "
                              "the file was edited or is not this adapter's.")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{where}: a head in modules_to_save beside prefix tuning is not converted; keep the "
                              "adapter in PEFT.")
    embeddings = tensors[KEY]
    stack = next(iter(model.layout.stacks.values()))
    kv_heads, head_dim = model.layout.attention_shape(stack)
    positions, width, layers = int(cfg.get("num_virtual_tokens", 0)), kv_heads * head_dim, stack.num_layers
    if tuple(embeddings.shape) != (positions, layers * 2 * width):
        raise CheckpointError(
            f"{where}: '{KEY}' has shape {tuple(embeddings.shape)}, but this model needs ({positions}, {layers * 2 * width}) "
            f"({positions} virtual tokens x {layers} layers x key and value x {kv_heads} heads x {head_dim}); load it "
            "into the base model it was trained on."
        )
    prefix = _rotate_keys(embeddings.reshape(positions, layers, 2, width).permute(1, 2, 0, 3), model, -1)
    config = PrefixTuningConfig(prefix_length=positions, flat=True)
    return checkpoint(model, name, config, {"layers.self_attention": {"prefix": prefix}}, None, {}, where)


def write(config: PrefixTuningConfig, sites: dict[str, dict[str, torch.Tensor]], model: Any
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` fields and tensors for a prefix-tuning adapter."""
    _check_model(model.layout, "PEFT")
    refuse_options(config, HANDLED, "PEFT")
    (prefix,) = (_rotate_keys(params["prefix"], model, +1) for params in sites.values())  # (layers, 2, P, width)
    layers, _, positions, width = prefix.shape
    kv_heads, _ = model.layout.attention_shape(next(iter(model.layout.stacks.values())))
    out = {KEY: prefix.permute(2, 0, 1, 3).reshape(positions, layers * 2 * width).contiguous()}
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": positions,
            "token_dim": width, "num_layers": layers, "num_attention_heads": kv_heads,
            "num_transformer_submodules": 1, "encoder_hidden_size": width, "prefix_projection": False}, out
