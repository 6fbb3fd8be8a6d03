"""Compacter: a bottleneck adapter whose projections are PHM layers with a rule shared by all layers.

Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", sec. 3: each
projection's weight is a sum of Kronecker products ``H = sum_i A_i (x) W_i`` of ``n = phm_dim``
small "rule" matrices ``A_i`` (n, n), shared by every adapter layer, and per-layer matrices
``W_i = s_i t_i^T`` of rank ``phm_rank`` (sec. 3.3, "low-rank parameterisation"). A projection of
``d`` to ``m`` features then trains ``n (d/n + m/n) r + m`` values instead of ``d m + m``.
AdapterHub's ``compacter`` (Houlsby placement) and ``compacter++`` (Pfeiffer placement) presets,
GELU, with AdapterHub's tensor names (``W_left`` (n, in/n, r), ``W_right`` (n, r, out/n), ``b``,
``phm_rule`` (n, n, n)) and its product ``y = x H + b``, so its checkpoints load exactly.

A ``PHMLinear`` offers ``weight`` / ``bias`` as a Linear does (``H^T`` computed on demand), so the
bottleneck's code, fused paths and batched routing run unchanged. The rule is one ``nn.Parameter``
per adapter, registered in every PHM layer of it (``build_units``): trained once, saved under each
layer's name (the copies load the same value). The up-projection's ``W_right`` and bias start at
zero, so a fresh adapter is the identity (AdapterHub starts it random).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..places.slots import Site
from .base import small_normal_
from .bottleneck import Bottleneck, BottleneckConfig

__all__ = ["CompacterConfig", "PHMLinear", "Compacter"]


class PHMLinear(nn.Module):
    """``y = x H + b`` with ``H = sum_i kron(phm_rule[i], W_left[i] @ W_right[i])`` (in, out)."""

    def __init__(self, in_features: int, out_features: int, rule: nn.Parameter, rank: int):
        super().__init__()
        n = rule.shape[0]
        self.in_features, self.out_features = in_features, out_features
        self.phm_rule = rule  # the adapter's shared rule (n, n, n)
        self.W_left = nn.Parameter(torch.empty(n, in_features // n, rank))
        self.W_right = nn.Parameter(torch.empty(n, rank, out_features // n))
        self.b = nn.Parameter(torch.zeros(out_features))
        for i in range(n):  # AdapterHub's glorot-uniform per rule slot
            nn.init.xavier_uniform_(self.W_left.data[i])
            nn.init.xavier_uniform_(self.W_right.data[i])

    @property
    def weight(self) -> torch.Tensor:
        w = torch.bmm(self.W_left, self.W_right)  # (n, in/n, out/n)
        h = sum(torch.kron(self.phm_rule[i], w[i]) for i in range(w.shape[0]))  # (in, out)
        return h.T  # (out, in), as a Linear's

    @property
    def bias(self) -> torch.Tensor:
        return self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.b)


class Compacter(Bottleneck):
    """A bottleneck whose ``down`` and ``up`` are ``PHMLinear`` layers."""

    def __init__(self, config: "CompacterConfig", reads: int, writes: int, rule: nn.Parameter):
        super().__init__(config, reads, writes)
        width = self.down.out_features
        self.down = PHMLinear(reads, width, rule, config.phm_rank)
        self.up = PHMLinear(width, writes, rule, config.phm_rank)
        with torch.no_grad():
            self.up.W_right.zero_()  # H_up = 0 and b = 0: the identity, with gradients on W_right

    def init_nonzero(self) -> None:
        small_normal_(self.up.W_right)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Each layer's copy of the shared rule as its own tensor (safetensors refuses shared memory)."""
        return {k: v.clone() if k.endswith("phm_rule") else v for k, v in self.state_dict().items()}


@register_method("compacter")
@dataclass(frozen=True)
class CompacterConfig(BottleneckConfig):
    """A bottleneck adapter (every ``BottleneckConfig`` option) with PHM projections.

    Args:
        phm_dim: ``n``, the number of Kronecker terms; divides the widths of both projections.
        phm_rank: rank of each per-layer ``W_i``.
        phm_init_range: std of the rule's normal initialisation.
    """

    #: ``adapterkit train``'s default: on SST-2 dev (MiniLM, 3 epochs) 1e-2 beat 2e-3 (87.70 against
    #: 86.30 %); the paper trains Compacter at 3e-3 for many more steps
    training_lr = 1e-2

    phm_dim: int = 4
    phm_rank: int = 1
    phm_init_range: float = 1e-4

    def validate(self) -> None:
        super().validate()
        if self.phm_dim < 1 or self.phm_rank < 1:
            raise AdapterError(f"phm_dim and phm_rank must be positive, got {self.phm_dim} and {self.phm_rank}.")

    def build_units(self, sites: Sequence[Site]) -> nn.ModuleDict:
        """One rule for the whole adapter, shared by every PHM layer it builds."""
        rule = nn.Parameter(torch.empty(self.phm_dim, self.phm_dim, self.phm_dim).normal_(std=self.phm_init_range))
        building = dataclasses.replace(self)
        object.__setattr__(building, "_rule", rule)  # this build only; the user's config is untouched
        return AdapterConfig.build_units(building, sites)

    def build(self, site: Site) -> nn.Module:
        rule: Optional[nn.Parameter] = getattr(self, "_rule", None)
        if rule is None:  # one site alone (the loader's shape check)
            rule = nn.Parameter(torch.zeros(self.phm_dim, self.phm_dim, self.phm_dim))
        if site.place == "pre":
            reads = writes = site.in_features
        else:
            reads = site.in_features if site.place == "parallel" and site.residual_from is None else site.out_features
            writes = site.out_features
        width = self.bottleneck_width(reads)
        if any(w % self.phm_dim for w in (reads, width, writes)):
            raise AdapterError(f"Compacter's phm_dim={self.phm_dim} must divide the widths {reads} -> {width} -> "
                               f"{writes} at '{site.place_id}'; choose another phm_dim or reduction_factor.")
        return self.gated(Compacter(self, reads, writes, rule), site)


register_preset("compacter", CompacterConfig(mh_adapter=True, output_adapter=True, original_ln_before=False,
                                             non_linearity="gelu", reduction_factor=32))
register_preset("compacter++", CompacterConfig(non_linearity="gelu", reduction_factor=32))
