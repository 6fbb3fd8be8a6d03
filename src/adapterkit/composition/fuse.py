"""AdapterFusion (Pfeiffer et al. 2021, sec. 3.2): attention over the outputs of several adapters.

At every slot where an adapter of ``Fuse(a, b, ...)`` sits, a ``FusionUnit`` reads the site's
value without adapters (``io.passthrough``, ``base``), each child's value there (``o_i``: the
child's adapter combined by its strategy; a child absent at the slot gives ``base``) and a query
``q``, and returns, as AdapterHub's ``BertFusion`` with its default (``"dynamic"``) options,

    d_i    = o_i - base                                           # each adapter's contribution
    scores = softmax_i( (W_q q) . (W_k d_i) / temperature )       # (B, T, n)
    out    = base + W_v sum_i scores_i * d_i                      # (B, T, d)

With ``residual_before=True`` (AdapterHub's option of that name) the base goes into the values
and keys instead: ``d_i`` above is replaced by ``o_i`` and ``out = W_v sum_i scores_i * o_i``.
The query is what the last adapter of the block reads at the slot (AdapterHub's ``pre_forward``:
a Pfeiffer adapter reads the model's layer norm of ``y + residual``), or ``base`` where that
adapter is absent, is not at a ``post`` place, or with ``query_before_ln=True``.

``W_v`` starts as the identity (AdapterHub's ``value_initialized``), ``W_q`` / ``W_k`` small, so
a fresh fusion is about the mean of its adapters' outputs. The forward computes this with one
``d x d`` projection per token for each of query, key and value, not one per adapter (see
``FusionUnit.forward``), and where the query and key weights need no gradient (inference) with
one for both, through their product folded once (``FusionUnit._query_key``); the key's bias, kept for AdapterHub's layout, adds the same to every
logit and so never changes the output (it gets no gradient). With ``regularization`` (the
default, as AdapterHub's Pfeiffer fusion) a training forward adds ``reg_weight * ||W_v - I||^2``
per slot to the forward context's auxiliary loss (``output.loss`` includes it). The last
forward's scores stay on each unit (``scores``, detached) for inspection
(``AdapterModel.fusion_scores``). AdapterHub's files: ``interop/fusion.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import context
from ..errors import AdapterError


@dataclass(frozen=True)
class FusionConfig:
    """Options of a fusion layer.

    Args:
        temperature: divides the attention logits.
        regularization: add ``reg_weight * ||W_v - I||^2`` to the loss while training.
        reg_weight: that term's weight (AdapterHub: 0.01).
        residual_before: the site's base value goes into the keys and values (AdapterHub's
            option); ``False``: they are the adapters' contributions and the base is added after.
        query_before_ln: the query is the site's base value, not what the last adapter reads
            (AdapterHub's option).
    """

    temperature: float = 1.0
    regularization: bool = True
    reg_weight: float = 0.01
    residual_before: bool = False
    query_before_ln: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise AdapterError(f"Fusion temperature must be > 0, got {self.temperature}.")
        if not self.reg_weight >= 0:
            raise AdapterError(f"Fusion reg_weight must be >= 0, got {self.reg_weight}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise AdapterError(f"Unknown fusion option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}.")
        return cls(**data)


class FusionUnit(nn.Module):
    """The fusion layer at one slot (module docstring)."""

    def __init__(self, width: int, config: FusionConfig):
        super().__init__()
        self.config = config
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(width))
        self.scores: torch.Tensor | None = None
        self._folded: tuple | None = None  # (weights' stamp, W_k^T W_q, b_q W_k): see _query_key

    def forward(self, query: torch.Tensor, base: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        # The same function as the module docstring's, with one projection per token instead of
        # one per adapter: q . (W_k v_i + b_k) = (W_k^T q) . v_i + q . b_k, whose last term is
        # equal for every adapter and cancels in the softmax; and sum_i s_i W_v v_i = W_v sum_i s_i v_i.
        values = list(outputs) if self.config.residual_before else [o - base for o in outputs]  # n x (B, T, d)
        qk = self._query_key(query)  # W_k^T W_q q: (B, T, d)
        logits = torch.stack([torch.linalg.vecdot(v, qk) for v in values], -1)  # (B, T, n)
        scores = F.softmax(logits / self.config.temperature, dim=-1)
        self.scores = scores.detach()
        if self.training and self.config.regularization and self.value.weight.requires_grad:
            eye = torch.eye(self.value.weight.shape[0], device=base.device, dtype=base.dtype)
            context.add_aux_loss(self.config.reg_weight * (self.value.weight - eye).pow(2).sum())
        # sum_i s_i v_i, one pass per adapter (no (B, T, n, d) copy of the values)
        mixed = values[0] * scores[..., 0:1]
        for i in range(1, len(values)):
            mixed = mixed.addcmul(values[i], scores[..., i:i + 1])
        out = self.value(mixed)  # (B, T, d)
        return out if self.config.residual_before else base + out

    def _query_key(self, query: torch.Tensor) -> torch.Tensor:
        """``(W_q q + b_q) W_k``: two projections while the query or key weights train; else one,
        through ``W_k^T W_q`` and ``b_q W_k``, folded once per change of those weights (at
        inference the fusion then costs two ``d x d`` projections per token, not three)."""
        weights = (self.query.weight, self.query.bias, self.key.weight)
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return torch.matmul(self.query(query), self.key.weight)
        stamp = tuple((id(w), w._version, w.data_ptr(), w.dtype, w.device) for w in weights)
        if self._folded is None or self._folded[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable in any later mode
                wq, bq, wk = (w.detach() for w in weights)
                self._folded = (stamp, wk.t() @ wq, bq @ wk)
        return F.linear(query, self._folded[1], self._folded[2])


def fusion_key(names: Sequence[str]) -> str:
    """The key a fusion of these adapters is kept under (AdapterHub's ``"a,b"``)."""
    return ",".join(names)


def build_fusion(names: Sequence[str], records: Mapping[str, Any], config: FusionConfig) -> nn.ModuleDict:
    """One ``FusionUnit`` per slot any of the adapters occupies, keyed by ``Site.key``."""
    units = nn.ModuleDict()
    places: dict[str, tuple[str, int]] = {}
    for name in names:
        if not type(records[name].config).supports_fusion:
            raise AdapterError(f"Fuse({', '.join(names)}): '{name}' is a {records[name].config.method} adapter, which Fuse "
                               "cannot attend over (it has no output of its own at its sites); use Stack instead.")
        for site in records[name].sites:
            width = site.in_features if site.place == "pre" else site.out_features
            seen = places.setdefault(site.key, (site.place, width))
            if seen != (site.place, width):
                raise AdapterError(
                    f"Fuse({', '.join(names)}): adapters meet '{site.place_id}' differently ({seen[0]} width {seen[1]} "
                    f"vs {site.place} width {width}); fuse adapters placed alike."
                )
            if site.key not in units:
                units[site.key] = FusionUnit(width, config)
    return units
