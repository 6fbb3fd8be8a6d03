"""DoRA: weight-decomposed LoRA, ``m * (W + s B A) / ||W + s B A||`` per output row.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", sec. 4.1: the adapted weight is a
learned magnitude ``m`` (one value per output row, initialised to the row norms of ``W``) times
the normalised direction ``W + s * B @ A`` (LoRA's update). Sec. 4.3: the norm is treated as a
constant in the backward pass (``detach``), as PEFT does. On a Linear with input ``x``::

    f = m / ||W + s B A||_row          # (out,), exactly 1 at init (B = 0, m = ||W||)
    y' = f * (W x + s B A x) + b       # PEFT; contribution = (f - 1) * W x + f * s * B A x

AdapterHub's ``DoRAConfig`` differs in two places, both options here: its norm leaves out the
scaling (``||W + B A||``: ``norm_with_scaling=False``) and its factor multiplies the bias too
(``rescale_bias=True``). Mergeable: ``W' = f * (W + s B A)`` (and ``b' = f * b`` with
``rescale_bias``), the formula of PEFT's ``merge``; unmerging restores the kept originals.
Linear layers (and GPT-2's ``Conv1D``) only, as in both peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Hashable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import register_method, register_preset
from ..errors import AdapterError
from ..layouts import linear_features
from ..places.slots import Site
from ..quantization import float_weight
from .lora import LoRAConfig
from .lora_layers import LoRA, SlicedSite

__all__ = ["DoRAConfig", "DoRA"]


@register_method("dora")
@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA on Linear layers: LoRA's options (``r``, ``alpha``, ``roles``, patterns, ...) plus

    Args:
        norm_with_scaling: the norm is of ``W + (alpha / r) * B @ A`` (PEFT, the paper); ``False``:
            of ``W + B @ A`` (AdapterHub ``adapters`` 1.x).
        rescale_bias: the magnitude factor also multiplies the host's bias (AdapterHub); ``False``:
            the bias is added unchanged (PEFT, the paper).
    """

    #: two DoRA adapters merged in turn differ from their ``Stack``: the second one's norm is then
    #: of the weight the first one changed (as in PEFT); each merges exactly on its own
    stack_merges_exactly: ClassVar[bool] = False

    norm_with_scaling: bool = True
    rescale_bias: bool = False

    def validate(self) -> None:
        super().validate()
        if self.init_weights != "lora":
            raise AdapterError(f"DoRA starts from LoRA's zero update; init_weights={self.init_weights!r} is for method "
                               "'lora'. Drop the option.")
        if self.use_gating:
            raise AdapterError("use_gating is AdapterHub's gated LoRA, which has no DoRA form there; use method 'lora' "
                               "with use_gating=True, or DoRA without it.")

    def build(self, site: Site) -> nn.Module:
        if isinstance(site, SlicedSite) and site.enabled or linear_features(site.host) is None:
            raise AdapterError(f"DoRA adapts whole Linear layers only, and '{site.place_id}' is "
                               f"{'a slice of a fused projection' if isinstance(site, SlicedSite) else type(site.host).__name__}; "
                               "choose other roles (e.g. 'qkv' instead of 'q' / 'v' on GPT-2) or use method 'lora'.")
        unit = super().build(site)  # rank checks; a LoRA with A random and B zero
        return DoRA(self.for_site(site.place_id), site, unit)


class DoRA(LoRA):
    """LoRA's ``lora_A`` / ``lora_B`` plus ``lora_magnitude_vector`` (out,), PEFT's names. Reads the
    host's weight (never copies it): ``base`` may already carry other adapters' changes, so the
    frozen ``W x`` is recomputed from the host. On a quantized host the weight is dequantized per
    forward (``quantization.float_weight``): the norm needs every entry of ``W``."""

    def __init__(self, config: DoRAConfig, site: Site, unit: LoRA):
        super().__init__(config, site.in_features, site.out_features, unit.transposed)
        with torch.no_grad():
            self.lora_A.copy_(unit.lora_A)
        self._host = (site.host,)  # in a tuple: not a submodule, not in the state dict
        self.norm_scale = self.scaling if config.norm_with_scaling else 1.0
        self.rescale_bias = config.rescale_bias
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(self.host_weight()).clone())

    def host_weight(self) -> torch.Tensor:
        weight = float_weight(self._host[0])  # a quantized base's: dequantized, for the norm and W x
        return weight.T if self.transposed else weight  # (out, in)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``||W + c B A||`` per output row (``c`` the scaling, or 1), as a constant (sec. 4.3)."""
        direction = weight + self.norm_scale * (self.lora_B @ self.lora_A).to(weight.dtype)  # (out, in)
        return torch.linalg.vector_norm(direction, dim=1).detach()  # (out,)

    def factor(self, weight: torch.Tensor) -> torch.Tensor:
        return self.lora_magnitude_vector / self.weight_norm(weight)  # (out,)

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        weight = self.host_weight()
        f = self.factor(weight)
        x = self.dropout(h)
        bias = self._host[0].bias if self.rescale_bias else None
        frozen = F.linear(x, weight, bias)  # (B, T, out)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling  # (B, T, out)
        return (f - 1) * frozen + f * update

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        return None

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        w = weight.T if self.transposed else weight  # (out, in)
        f = self.factor(w).to(w.dtype)
        delta = (self.lora_B @ self.lora_A).to(w.dtype) * self.scaling  # (out, in)
        new = f[:, None] * (w + delta)
        if self.rescale_bias and bias is not None:
            bias = bias * f
        return (new.T if self.transposed else new), bias

    def stack_key(self) -> Optional[Hashable]:
        return None  # no batched routing: each routed group runs on its own


register_preset("dora", DoRAConfig())
