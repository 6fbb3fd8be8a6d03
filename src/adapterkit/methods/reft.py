"""LoReFT (and NoReFT / DiReFT): low-rank interventions on hidden states at chosen positions.

Wu et al. 2024, "ReFT: Representation Finetuning for Language Models", sec. 3.1: after chosen
layers, at each example's first ``prefix_positions`` and last ``suffix_positions`` real tokens,
the hidden state ``h`` becomes::

    h + R^T (act(W h + b) - R h)        # LoReFT: R (r, d) with orthonormal rows

(``subtract_projection=False`` drops ``R h``: DiReFT; ``orthogonality=False``: NoReFT), then
dropout. This is AdapterHub ``adapters`` 1.x's ``ReftModule`` parameter for parameter
(``units.<i>.learned_source``, ``units.<i>.projection`` with torch's orthogonal
parametrisation), so its checkpoints map key for key. The positions are part of the place
(``Site.positions``): the site is each chosen block's output, and the slot hands the module the
call's attention mask, from which ``places/slots.token_positions`` finds the first and last real tokens
(left padding counted, as AdapterHub counts it). ``tied_weights``: one unit for both ends, else one
each. Not the identity at init (``W``, ``b`` and ``R`` start random, as in the paper); not
mergeable (it acts per position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..places.slots import Site, SlotIO, token_positions
from .base import AdapterModule
from .bottleneck import ACTIVATIONS


@register_method("reft")
@dataclass(frozen=True)
class ReftConfig(AdapterConfig):
    """ReFT interventions after the chosen layers (AdapterHub's ``ReftConfig`` options).

    Args:
        prefix_positions: intervene on each example's first this many real tokens.
        suffix_positions: and on its last this many.
        r: rank of the intervention.
        orthogonality: ``R`` with orthonormal rows (torch's orthogonal parametrisation).
        tied_weights: one intervention for the prefix and the suffix positions.
        subtract_projection: subtract ``R h`` (LoReFT); ``False``: DiReFT.
        dropout: dropout on the intervened states while training.
        non_linearity: activation of ``W h + b`` (``None``: none).
    """

    supports_fusion = False

    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: Optional[str] = None

    def validate(self) -> None:
        if self.prefix_positions < 0 or self.suffix_positions < 0 or self.prefix_positions + self.suffix_positions == 0:
            raise AdapterError(f"ReFT intervenes on prefix_positions={self.prefix_positions} and suffix_positions="
                               f"{self.suffix_positions} tokens; choose numbers >= 0, not both 0.")
        if self.r < 1:
            raise AdapterError(f"ReFT rank r must be a positive integer, got {self.r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.non_linearity is not None and self.non_linearity.lower() not in ACTIVATIONS:
            raise AdapterError(f"non_linearity='{self.non_linearity}' is not supported; use one of "
                               f"{', '.join(ACTIVATIONS)} or None.")
        if self.place not in (None, "post") or self.target_modules is not None:
            raise AdapterError("ReFT intervenes on the outputs of the model's layers; drop place= and target_modules= "
                               "(choose layers with layers=, leave_out=, stacks=).")

    def sites(self, layout: Any) -> list[Site]:
        if not layout.stacks:
            raise AdapterError(f"ReFT intervenes after a model's transformer layers, and this {layout.model_type} model "
                               "has no layout naming them; use a transformers model of a known family.")
        sites = []
        for stack in layout.select_stacks(self.stacks, "ReFT interventions"):
            for i in layout.layer_indices(stack, self.layers, self.leave_out):
                sites.append(Site(place_id=f"{stack.prefix}.{i}.output", host=stack.blocks[i],
                                  in_features=layout.hidden_size, out_features=layout.hidden_size, layer=i,
                                  place="post", stack=stack.name,
                                  positions=(self.prefix_positions, self.suffix_positions)))
        return sites

    def build(self, site: Site) -> nn.Module:
        return Reft(self, site.out_features, site.positions)


class ReftUnit(nn.Module):
    """One intervention: ``h + (act(W h + b) - R h) R``, then dropout (AdapterHub's ``ReftUnit``)."""

    def __init__(self, config: ReftConfig, width: int):
        super().__init__()
        self.learned_source = nn.Linear(width, config.r)  # W, b
        projection = nn.Linear(width, config.r, bias=False)  # R
        self.projection = nn.utils.parametrizations.orthogonal(projection) if config.orthogonality else projection
        self.act = ACTIVATIONS[config.non_linearity.lower()]() if config.non_linearity else nn.Identity()
        self.subtract_projection = config.subtract_projection
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        source = self.act(self.learned_source(h))  # (B, n, r)
        if self.subtract_projection:
            source = source - self.projection(h)
        return self.dropout(h + source @ self.projection.weight)  # (B, n, d)


class Reft(AdapterModule):
    """The interventions of one layer: ``units`` (one, or one for the prefix and one for the suffix
    positions). Its contribution is the change at the chosen positions, zero elsewhere."""

    def __init__(self, config: ReftConfig, width: int, positions: tuple[int, int]):
        super().__init__()
        self.first, self.last = positions
        self.tied = config.tied_weights
        self.units = nn.ModuleList(ReftUnit(config, width) for _ in range(1 if self.tied else 2))

    def read(self, io: SlotIO) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """What it reads is the call's attention mask (where the real tokens are); it rewrites the
        layer's output."""
        return io.attention_mask, io.y

    def forward(self, mask: Optional[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        batch, length, width = base.shape
        head, tail = token_positions(mask, batch, length, self.first, self.last, base.device)
        pick = lambda idx: base.gather(1, idx[..., None].expand(-1, -1, width))  # noqa: E731  (B, n, d)
        if self.tied:
            new = self.units[0](torch.cat([pick(head), pick(tail)], dim=1))
            new_head, new_tail = new[:, :head.shape[1]], new[:, head.shape[1]:]
        else:
            new_head, new_tail = self.units[0](pick(head)), self.units[1](pick(tail))
        out = base
        if self.first:
            out = out.scatter(1, head[..., None].expand(-1, -1, width), new_head.to(base.dtype))
        if self.last:  # written after the prefix, as AdapterHub writes it, where the two overlap
            out = out.scatter(1, tail[..., None].expand(-1, -1, width), new_tail.to(base.dtype))
        return out - base


register_preset("loreft", ReftConfig())
register_preset("noreft", ReftConfig(orthogonality=False))
register_preset("direft", ReftConfig(orthogonality=False, subtract_projection=False))
