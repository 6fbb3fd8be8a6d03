"""AdapterHub's ``use_gating``: a learned gate, computed from the input, on an adapter's output.

Mao et al. 2022 (UniPELT, sec. 3.2) multiply each sub-module's contribution by a gate
``G = sigmoid(W x + b)`` read from that sub-module's input. AdapterHub ``adapters`` 1.x
implements it (``methods/lora.py``, ``methods/modeling.py``, ``methods/prefix_tuning.py``) as
``mean over tokens of sigmoid(Linear(x))``: one gate per example, ``nn.Linear(width, outputs)``
saved as ``gate.weight`` / ``gate.bias`` beside the adapter's own tensors. ``TokenGate`` is that
``nn.Linear`` (same names, same shapes), with BERT's init (weight N(0, 0.02), bias zero).

**Where the mean runs.** In an encoder stack (bidirectional attention) the gate is AdapterHub's,
the mean over every position of the call (padding included, as there). In a decoder stack (causal
attention: GPT-2, Llama, the decoder of T5 / BART) a mean over the call's tokens would let a token
see later ones, and generating with a KV cache (one token per call) would differ from recomputing
the sequence; there the gate is the paper's, per token (``per_token``), which is causal and gives
cache = recompute exactly. Prefix gating scales a layer's prefix keys and values by one gate per
example, which a per-token gate cannot express in one attention call, so gated prefixes are
refused in decoder stacks (``check_prefix_site``).

A gated adapter is not mergeable (its update depends on the input); ``gating_refusal`` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..errors import AdapterError

if TYPE_CHECKING:  # pragma: no cover
    from ..places.slots import Site

#: the stack whose attention is causal: its gates are per token
CAUSAL_STACK = "decoder"


class TokenGate(nn.Linear):
    """``sigmoid(Linear(x))`` over the last dimension, averaged over the tokens (dimension 1)
    unless ``per_token``: (B, T, width) -> (B, 1, outputs), or (B, T, outputs)."""

    def __init__(self, width: int, outputs: int = 1, *, per_token: bool = False):
        super().__init__(width, outputs)
        self.per_token = per_token
        with torch.no_grad():
            nn.init.normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(super().forward(x))  # (B, T, outputs)
        if self.per_token or g.dim() < 3:
            return g
        return g.mean(dim=1, keepdim=True)  # (B, 1, outputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_token={self.per_token}"


def gate_for(site: "Site", width: int, outputs: int = 1) -> TokenGate:
    """The gate of a unit at ``site`` reading ``width`` features (per token in a decoder stack)."""
    return TokenGate(width, outputs, per_token=site.stack == CAUSAL_STACK)


def check_prefix_site(site: "Site") -> None:
    """Refuse a gated prefix in a causal stack (module docstring)."""
    if site.stack == CAUSAL_STACK:
        raise AdapterError(
            f"use_gating on prefixes is for encoder stacks: in the decoder ('{site.place_id}') AdapterHub's gate, a mean "
            "over the call's tokens, would let a token see later ones and make generation with a KV cache differ from "
            "recomputing. Pass use_gating=False for the prefix, or stacks=['encoder'] on an encoder-decoder.")


def gating_refusal(config) -> Optional[str]:
    """Why a config with ``use_gating`` cannot be merged, or ``None``."""
    if getattr(config, "use_gating", False):
        return "it has use_gating=True: its gate depends on the input, so no fixed weight equals it (as in AdapterHub)"
    return None
