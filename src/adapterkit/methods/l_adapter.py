"""L-adapters: a path from every encoder layer to the head (the "L" of ELP-adapter tuning).

Inoue, Otake et al. 2024, "ELP-Adapters: Parameter Efficient Adapter Tuning for Various Speech
Processing Tasks": each encoder layer's output ``h_l`` goes through a small adapter of its own,
``L_l(h_l) = LayerNorm(act(W_l h_l + b_l))``, and the head reads their learned softmax-weighted
sum ``sum_l softmax(w)_l L_l(h_l)`` instead of the last layer's output, so that features of the
lower layers (speaker, prosody) reach the task.

In the core's terms (``docs/design.md``) an L-adapter is one module at one site: the ``post``
place of a stack's *output* (the module holding the blocks, e.g. ``Wav2Vec2Encoder``; its
``last_hidden_state`` is what the head reads), with the site tapping every chosen block's output
(``Site.layers_from`` -> ``SlotIO.layers``, captured by the slot's hooks during the same
forward). The module's contribution is the delta ``mix - base``, so with the ``add`` strategy
the head reads the mix itself, and with ``gate`` the model starts from the unchanged output and
learns how far to move towards the mix. It is not the identity at init (the sum replaces the
representation, as in the paper). Per-example routing takes the rows of every tapped layer
with the rows of the site (``SlotIO.rows``), so each example gets its own adapter's sum.

The E-adapters are bottleneck adapters after the attention and the feed-forward of every encoder
layer (the ``e_adapter`` preset, ``bottleneck.py``); ``"e_adapter+l_adapter"`` trains both as
one adapter (``union.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..places.slots import Site, SlotIO
from .base import AdapterModule
from .bottleneck import ACTIVATIONS


@register_method("l_adapter")
@dataclass(frozen=True)
class LAdapterConfig(AdapterConfig):
    """An L-adapter over the layers of each chosen stack (``layers`` / ``leave_out`` choose the
    layers that feed the sum; every layer by default).

    Args:
        non_linearity: relu (default), gelu, swish (= silu) or tanh.
        dropout: dropout on each layer's adapter output (training only).
    """

    places = ("post",)

    non_linearity: str = "relu"
    dropout: float = 0.0

    def validate(self) -> None:
        if self.non_linearity not in ACTIVATIONS:
            raise AdapterError(f"non_linearity='{self.non_linearity}' is unknown; use one of {', '.join(ACTIVATIONS)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.target_modules is not None:
            raise AdapterError("An L-adapter sits at the output of a stack of layers; target_modules cannot place it. "
                               "Choose the layers that feed it with layers= / leave_out=, the stack with stacks=.")

    def sites(self, layout) -> list[Site]:
        return layout.output_sites(self.layers, self.leave_out, self.stacks)

    def build(self, site: Site) -> nn.Module:
        return LAdapter(len(site.layers_from), site.out_features, self.non_linearity, self.dropout)


class LayerPath(nn.Sequential):
    """One layer's path to the head: Linear, activation, LayerNorm (and optional dropout)."""

    def __init__(self, width: int, non_linearity: str, dropout: float):
        super().__init__(nn.Linear(width, width), ACTIVATIONS[non_linearity](), nn.LayerNorm(width), nn.Dropout(dropout))


class LAdapter(AdapterModule):
    """Per-layer paths and the softmax weights of their sum; contribution ``mix - base``."""

    def __init__(self, num_layers: int, width: int, non_linearity: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.paths = nn.ModuleList(LayerPath(width, non_linearity, dropout) for _ in range(num_layers))
        self.layer_weights = nn.Parameter(torch.zeros(num_layers))  # softmax(0) = an even mix at init

    def read(self, io: SlotIO) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        if len(io.layers) != len(self.paths):
            raise AdapterError(
                f"The L-adapter expected the outputs of {len(self.paths)} layers but its slot captured "
                f"{len(io.layers)}; the stack's blocks must run inside the module it sits on.")
        return torch.stack(io.layers), io.y  # (L, B, T, d)

    def forward(self, h: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.layer_weights, dim=0).to(base.dtype)
        mix = sum(w * path(layer) for w, path, layer in zip(weights, self.paths, h))  # (B, T, d)
        return mix - base

    def init_nonzero(self) -> None:
        """Already non-zero (a gate strategy starts from the unchanged output)."""

    @property
    def mix_weights(self) -> torch.Tensor:
        """The softmax weight of each layer in the sum (detached), for inspection."""
        return torch.softmax(self.layer_weights.detach(), dim=0)


register_preset("l_adapter", LAdapterConfig())
