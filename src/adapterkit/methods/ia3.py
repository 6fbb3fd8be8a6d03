"""(IA)^3: learned vectors that rescale the outputs (or inputs) of chosen Linear layers.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3: ``y * l`` on keys, values and the FFN's intermediate activations, with
``l`` initialised to ones (identity). The module's contribution is the factor ``l``; the
``multiply`` strategy applies it. At the ``weight`` place it scales the Linear's output, at the
``pre`` place its input (PEFT's ``feedforward_modules``). Mergeable: scaling the weight's output
rows and the bias, or its input columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable, Optional, Sequence

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..slots import Site, SlotIO
from .base import AdapterModule, gather, small_normal_


@register_method("ia3")
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 on Linear layers; ``roles=None`` = ``default_roles``: keys and values (of self- and
    cross-attention) and the FFN input projection, as Liu et al. 2022 sec. 3.3."""

    supports_merge = True
    places = ("weight", "pre")
    default_strategy = "multiply"
    #: roles used when ``roles`` is None; a role a stack lacks is skipped there
    default_roles: ClassVar[tuple[str, ...]] = ("k", "v", "ffn_in", "cross_k", "cross_v")

    roles: Optional[tuple[str, ...]] = None

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self)

    def build(self, site: Site) -> nn.Module:
        scales_input = site.place == "pre"  # PEFT's feedforward_modules: the Linear's input
        width = site.in_features if scales_input else site.out_features
        return IA3(width, transposed=type(site.host).__name__ == "Conv1D", scales_input=scales_input)


class IA3(AdapterModule):
    """A learned vector ``l``: its contribution is the factor ``l`` (ones at init)."""

    output = "factor"
    stacked_strategy = "multiply"

    def __init__(self, features: int, transposed: bool = False, scales_input: bool = False):
        super().__init__()
        self.transposed = transposed  # host stores its weight as (in, out), like transformers' Conv1D
        self.scales_input = scales_input
        self.ia3_l = nn.Parameter(torch.ones(features))

    def init_nonzero(self) -> None:
        small_normal_(self.ia3_l)
        with torch.no_grad():
            self.ia3_l.add_(1.0)

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        """Output scaling rescales the weight's output rows and the bias; input scaling its
        input columns only."""
        scale = self.ia3_l.to(weight.dtype)
        scales_rows = self.transposed == self.scales_input  # a (out, in) weight's rows are outputs
        weight = weight * (scale[:, None] if scales_rows else scale[None, :])
        if self.scales_input or bias is None:
            return weight, bias
        return weight, bias * scale

    def forward(self, h: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        return self.ia3_l

    def stack_key(self) -> Optional[Hashable]:
        return (self.ia3_l.shape[0],)

    @classmethod
    def run_stacked(cls, units: Sequence["IA3"], which: torch.Tensor, io: SlotIO) -> torch.Tensor:
        _, base = units[0].read(io)
        scale = gather([u.ia3_l for u in units], which)  # (B, out)
        return base * scale.view(scale.shape[0], *([1] * (base.dim() - 2)), scale.shape[1])


register_preset("ia3", IA3Config())
