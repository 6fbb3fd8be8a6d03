"""(IA)^3: learned vectors that rescale the outputs (or inputs) of chosen Linear layers.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3: ``y * l`` on keys, values and the FFN's intermediate activations, with
``l`` initialised to ones (identity). The FFN scaling of the paper sits after the activation,
i.e. on the *input* of the FFN's second projection: ``input_modules`` selects sites whose input
is scaled instead (PEFT's ``feedforward_modules``). Mergeable: scaling the weight's output rows
(and bias), or its input columns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..slots import Site, SlotIO


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

    roles: Optional[tuple[str, ...]] = None
    input_modules: str | tuple[str, ...] | None = None

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self, "ia3_default")

    def scales_input(self, place_id: str) -> bool:
        """Whether the site ``place_id`` has its input (not its output) scaled."""
        chosen = self.input_modules
        if chosen is None:
            return False
        if isinstance(chosen, str):
            return re.fullmatch(chosen, place_id) is not None
        return any(place_id == s or place_id.endswith("." + s) for s in chosen)

    def build(self, site: Site) -> nn.Module:
        transposed = type(site.host).__name__ == "Conv1D"
        if self.scales_input(site.place_id):
            return IA3(site.in_features, transposed, host=site.host)
        return IA3(site.out_features, transposed)


class IA3(nn.Module):
    """``ia3_l``: one scale per output feature, or per input feature when built with the ``host``."""

    def __init__(self, features: int, transposed: bool = False, host: Optional[nn.Module] = None):
        super().__init__()
        self.transposed = transposed
        self.scales_input = host is not None
        self._host = (host,)  # a tuple, so the frozen host is not registered as a sub-module
        self.ia3_l = nn.Parameter(torch.ones(features))

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        scale = self.ia3_l.to(weight.dtype)
        if self.scales_input:  # columns of W (out, in), rows of Conv1D's (in, out)
            return weight * (scale[:, None] if self.transposed else scale[None, :]), bias
        weight = weight * (scale[None, :] if self.transposed else scale[:, None])
        return weight, (bias * scale if bias is not None else None)

    def forward(self, io: SlotIO) -> torch.Tensor:
        if not self.scales_input:
            return io.y * self.ia3_l
        # The host's product again on the scaled input (to move onto the "pre" place).
        host = self._host[0]
        weight = host.weight.T if self.transposed else host.weight
        return F.linear(io.x * self.ia3_l, weight, host.bias)  # (B, T, in) -> (B, T, out)


register_preset("ia3", IA3Config())
