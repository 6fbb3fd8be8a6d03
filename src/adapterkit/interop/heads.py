"""Prediction heads of foreign checkpoints as adapterkit ``Head`` weights.

adapterkit's ``Head`` is ``[Dropout, Linear, Tanh] * (layers - 1) + [Dropout, Linear]`` on a
pooled (or per-token) hidden state, so its Linear layers sit at ``mlp.1``, ``mlp.4``, ``mlp.7``.
The foreign heads that are exactly such an MLP map onto it layer by layer; a foreign layer may
come from the base model itself (BERT's ``pooler.dense``, read by ``BertForSequenceClassification``
and by AdapterHub's ``use_pooler``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import CheckpointError
from ..layouts import Layout


def linear_index(j: int) -> int:
    """Index in ``Head.mlp`` of the head's ``j``-th Linear layer."""
    return 3 * j + 1


def base_module_weights(layout: Layout, suffix: str, where: str) -> dict[str, torch.Tensor]:
    """``weight`` / ``bias`` of the base model's module whose name ends with ``suffix``."""
    for name, module in layout.model.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return {"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()}
    raise CheckpointError(f"{where}: the head reads the base model's '{suffix}', which this model lacks; load the "
                          "base model with it (e.g. BertModel with its pooler).")


def head_layers(layers: list[dict[str, Optional[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """adapterkit head tensors from ``[{"weight": w, "bias": b or None}, ...]`` (a missing bias is zero)."""
    out: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(layers):
        w = layer["weight"]
        b = layer.get("bias")
        out[f"mlp.{linear_index(j)}.weight"] = w
        out[f"mlp.{linear_index(j)}.bias"] = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def resolved_pooling(pooling: str, layout: Layout) -> str:
    """``"auto"`` made concrete, as ``Head`` does it."""
    if pooling != "auto":
        return pooling
    return "last" if layout.is_decoder else "mean"
