"""(IA)^3: learned vectors that rescale the outputs (or inputs) of chosen Linear layers.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3: ``y * l`` on keys, values and the FFN's intermediate activations, with
``l`` initialised to ones (identity). The paper's FFN scaling sits after the activation, i.e. on
the *input* of the FFN's second projection: ``input_modules`` selects sites whose input is scaled
(PEFT's ``feedforward_modules``), which take the ``pre`` place; the others take the ``weight``
place and have their output scaled. The module's contribution is the factor ``l``; the
``multiply`` strategy applies it. Mergeable: scaling the weight's output rows and the bias, or
its input columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Hashable, Optional, Sequence

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..places.slots import Site, SlotIO
from .base import AdapterModule, gather, per_row, small_normal_


@register_method("ia3")
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 on Linear layers.

    Args:
        roles: layout roles to scale; ``None`` = keys, values and the FFN input projection.
        input_modules: sites whose *input* is scaled (PEFT's ``feedforward_modules``): a regex
            matched against the whole place id, or a list of place-id suffixes
            (``["output.dense"]``); the other sites have their output scaled.
    """

    supports_merge = True
    places = ("weight", "pre")
    #: ``adapterkit train``'s default: on SST-2 dev (MiniLM, 3 epochs) 1e-2 beat 2e-3 (87.95 against
    #: 86.30 %); a scaling vector that starts at one moves slowly at the bottleneck adapters' rate
    training_lr = 1e-2
    default_strategy = "multiply"
    #: roles used when ``roles`` is None; a role a stack lacks is skipped there
    default_roles: ClassVar[tuple[str, ...]] = ("k", "v", "ffn_in", "cross_k", "cross_v")

    roles: Optional[tuple[str, ...]] = None
    input_modules: str | tuple[str, ...] | None = None

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self)

    def scales_input(self, place_id: str) -> bool:
        """Whether the site ``place_id`` has its input (not its output) scaled."""
        chosen = self.input_modules
        if chosen is None:
            return False
        if isinstance(chosen, str):
            return re.fullmatch(chosen, place_id) is not None
        return any(place_id == s or place_id.endswith("." + s) for s in chosen)

    def build(self, site: Site) -> nn.Module:
        scales_input = site.place == "pre"  # input_modules (PEFT's feedforward_modules)
        width = site.in_features if scales_input else site.out_features
        return IA3(width, transposed=type(site.host).__name__ == "Conv1D", scales_input=scales_input)

    def place_for(self, site: Site) -> str:
        if self.place is not None:
            return self.place
        return "pre" if self.scales_input(site.place_id) else "weight"


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
    def run_stacked(cls, units: Sequence["IA3"], which: Optional[torch.Tensor], io: SlotIO) -> torch.Tensor:
        _, base = units[0].read(io)
        scale = gather([u.ia3_l for u in units], per_row(which, len(units), base.shape[0], base.device))  # (B, out)
        return base * scale.view(scale.shape[0], *([1] * (base.dim() - 2)), scale.shape[1])


register_preset("ia3", IA3Config())
