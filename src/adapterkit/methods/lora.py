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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..slots import Site, SlotIO
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
            ...), or ``"all-linear"`` for every projection of the blocks; ``None`` = the
            architecture's default (query and value; GPT-2's fused ``qkv``). On SST-2 with MiniLM,
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
        return layout.weight_sites(self, "lora_default")

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


class LoRA(nn.Module):
    """``lora_A`` (r, in) and ``lora_B`` (out, r), the names PEFT and AdapterHub use."""

    def __init__(self, config: LoRAConfig, in_features: int, out_features: int, transposed: bool = False):
        super().__init__()
        self.scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.transposed = transposed  # host stores its weight as (in, out), like transformers' Conv1D
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update in the host's weight layout."""
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return weight + self.delta_weight().to(weight.dtype), bias

    def forward(self, io: SlotIO) -> torch.Tensor:
        y = io.y
        xa = F.linear(self.dropout(io.x), self.lora_A)  # (B, T, in) -> (B, T, r)
        return add_linear(y, xa, self.lora_B, scale=self.scaling)  # (B, T, out)


register_preset("lora", LoRAConfig())
