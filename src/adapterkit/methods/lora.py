"""LoRA: a low-rank update ``W + (alpha / r) * B @ A`` on chosen Linear layers.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", sec. 4.1: ``A`` random
(Kaiming-uniform, as in the reference implementation), ``B`` zero, so a fresh adapter changes
nothing. The forward runs unmerged as ``y + scaling * B(A(dropout(x)))`` (cheap: rank ``r``, and
the scaling and the add ride on the second GEMM, see ``fused.add_linear``);
``merged`` folds the same delta into the weight, so merge, unmerge and forward all derive from
``delta_weight``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..slots import Site, SlotIO
from .base import AdapterModule, gather, small_normal_
from .fused import add_linear


@register_method("lora")
@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """LoRA on Linear layers.

    Args:
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch's input.
        roles: layout roles to adapt (``"q"``, ``"k"``, ``"v"``, ``"attn_proj"``, ``"ffn_in"``,
            ...), or ``"all-linear"`` for every projection of the blocks; ``None`` =
            ``default_roles``: query and value, in self- and cross-attention (PEFT's T5 default
            ``["q", "v"]`` hits both); GPT-2's fused ``qkv`` stands for them. On SST-2 with MiniLM,
            ``"all-linear"`` came within 0.9 points of full fine-tuning where query and value
            stayed 2.2 points short (``docs/training.md``).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA, Kalajdzievski 2023) instead
            of ``alpha / r``; PEFT's ``use_rslora``.
        rank_pattern / alpha_pattern: per-site ``r`` / ``alpha``, PEFT's options of the same names:
            ``{pattern: value}``, where a pattern is a regex matched against the end of the place id
            (``"value"`` or ``"layers.0.attention.self.query"``); the first matching pattern
            wins, sites matching none use ``r`` / ``alpha``.
    """

    supports_merge = True
    places = ("weight",)
    #: roles used when ``roles`` is None; a role a stack lacks is skipped there
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v", "cross_q", "cross_v")

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    roles: Optional[tuple[str, ...]] = None
    use_rslora: bool = False
    rank_pattern: Optional[dict[str, int]] = None
    alpha_pattern: Optional[dict[str, float]] = None

    def validate(self) -> None:
        ranks = [self.r, *(self.rank_pattern or {}).values()]
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
            raise AdapterError(f"LoRA rank r must be a positive integer, got {ranks} (r and rank_pattern).")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        for option in ("rank_pattern", "alpha_pattern"):
            for pattern in getattr(self, option) or {}:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise AdapterError(f"{option} key {pattern!r} is not a valid regex ({err}).") from None

    def for_site(self, place_id: str) -> "LoRAConfig":
        """This config with ``r`` and ``alpha`` resolved for one site (patterns applied)."""
        r = pattern_value(self.rank_pattern, place_id, self.r)
        alpha = pattern_value(self.alpha_pattern, place_id, self.alpha)
        return dataclasses.replace(self, r=r, alpha=alpha, rank_pattern=None, alpha_pattern=None)

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self)

    def build(self, site: Site) -> nn.Module:
        cfg = self.for_site(site.place_id)
        if cfg.r > min(site.in_features, site.out_features):
            raise AdapterError(
                f"LoRA rank r={cfg.r} exceeds the size of '{site.place_id}' "
                f"({site.out_features}x{site.in_features}); choose r <= {min(site.in_features, site.out_features)}."
            )
        return LoRA(cfg, site.in_features, site.out_features, transposed=_is_conv1d(site.host))


def pattern_value(patterns: Optional[dict], place_id: str, default):
    """PEFT's rule (``get_pattern_key``): the first pattern matching the end of the name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", place_id):
            return value
    return default


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


class LoRA(AdapterModule):
    """``lora_A`` (r, in) and ``lora_B`` (out, r), the names PEFT and AdapterHub use. Reads the
    host's input; its contribution is the delta ``scaling * B(A(dropout(x)))``."""

    def __init__(self, config: LoRAConfig, in_features: int, out_features: int, transposed: bool = False):
        super().__init__()
        self.scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.transposed = transposed  # host stores its weight as (in, out), like transformers' Conv1D
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def init_nonzero(self) -> None:
        small_normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update in the host's weight layout."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return weight + self.delta_weight().to(weight.dtype), bias

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        xa = F.linear(self.dropout(h), self.lora_A)  # (B, T, in) -> (B, T, r)
        return F.linear(xa, self.lora_B) * self.scaling  # (B, T, out)

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        xa = F.linear(self.dropout(h), self.lora_A)  # (B, T, in) -> (B, T, r)
        return add_linear(base, xa, self.lora_B, scale=self.scaling * scale)  # (B, T, out)

    # -- batched per-example routing -----------------------------------------------------------
    def stack_key(self) -> Optional[Hashable]:
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        return (self.lora_A.shape[1], self.lora_B.shape[0])

    @classmethod
    def run_stacked(cls, units: Sequence["LoRA"], which: torch.Tensor, io: SlotIO) -> torch.Tensor:
        """Each routed example through its own LoRA in two batched matmuls (BGMV); ranks are
        padded with zeros to the largest, which adds exact zeros."""
        h, base = units[0].read(io)
        n = base.shape[0]
        r = max(u.lora_A.shape[0] for u in units)
        a = gather([F.pad(u.lora_A, (0, 0, 0, r - u.lora_A.shape[0])) for u in units], which)  # (B, r, in)
        b = gather([F.pad(u.lora_B * u.scaling, (0, r - u.lora_B.shape[1])) for u in units], which)  # (B, out, r)
        xa = torch.bmm(h.reshape(n, -1, h.shape[-1]), a.transpose(1, 2))  # (B, T, r)
        return torch.baddbmm(base.reshape(n, -1, base.shape[-1]), xa, b.transpose(1, 2)).view(base.shape)


register_preset("lora", LoRAConfig())
