"""(IA)^3: learned vectors that rescale the outputs of chosen Linear layers.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3: ``y * l`` on keys, values and the FFN's intermediate activations, with
``l`` initialised to ones (identity). Mergeable: scaling the weight's output rows (and bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..slots import Site, SlotIO


@register_method("ia3")
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """(IA)^3 on Linear layers; ``roles=None`` = ``default_roles``: keys and values (of self- and
    cross-attention) and the FFN input projection, as Liu et al. 2022 sec. 3.3."""

    supports_merge = True
    #: roles used when ``roles`` is None; a role a stack lacks is skipped there
    default_roles: ClassVar[tuple[str, ...]] = ("k", "v", "ffn_in", "cross_k", "cross_v")

    roles: Optional[tuple[str, ...]] = None

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self)

    def build(self, site: Site) -> nn.Module:
        return IA3(site.out_features, transposed=type(site.host).__name__ == "Conv1D")


class IA3(nn.Module):
    def __init__(self, out_features: int, transposed: bool = False):
        super().__init__()
        self.transposed = transposed
        self.ia3_l = nn.Parameter(torch.ones(out_features))

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        scale = self.ia3_l.to(weight.dtype)
        weight = weight * (scale[None, :] if self.transposed else scale[:, None])
        return weight, (bias * scale if bias is not None else None)

    def forward(self, io: SlotIO) -> torch.Tensor:
        return io.y * self.ia3_l


register_preset("ia3", IA3Config())
