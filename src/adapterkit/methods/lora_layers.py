"""LoRA's modules, one per kind of host layer, all derived from one ``delta_weight``.

Hu et al. 2021, sec. 4.1: ``W + (alpha / r) * B @ A`` with one factor zero, so a fresh adapter
changes nothing. The host kinds follow PEFT's ``tuners/lora/layer.py`` (same tensor names and
shapes, so that PEFT folders map key for key) and loralib's ``MergedLinear``:

* ``LoRA``: ``nn.Linear`` and GPT-2's ``Conv1D``; ``lora_A`` (r, in) random, ``lora_B`` (out, r) zero;
* ``SlicedLoRA``: some output slices of a fused projection only (GPT-2's ``c_attn``, ``[q | k | v]``),
  loralib's ``MergedLinear(enable_lora=[True, False, True])``: each enabled slice has its own
  rank-``r`` pair, stored as loralib stores them (``lora_A`` (r * n, in), ``lora_B`` (d * n, r));
* ``EmbeddingLoRA``: ``nn.Embedding``; ``lora_embedding_A`` (r, num_embeddings) zero,
  ``lora_embedding_B`` (embedding_dim, r) normal (PEFT's init); the ids select columns of ``A``;
* ``ConvLoRA``: ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``; ``lora_A`` a convolution with the host's
  kernel, stride, padding and dilation (r, in, *kernel), ``lora_B`` a 1x1 convolution (out, r, 1...).

Every module's ``merged(weight, bias)`` adds ``delta_weight()`` in the host's own weight layout,
so merging is exact up to rounding and unmerging restores the kept originals (``folding.py``).
``HOSTS`` is the one table of what LoRA can adapt; ``host_kind(module)`` picks the entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..layouts import HostTypes, linear_features
from ..places.slots import Site, SlotIO
from .base import AdapterModule, gather, per_row, small_normal_
from .fused import add_linear

if TYPE_CHECKING:  # pragma: no cover
    from .lora import LoRAConfig


#: the "no dropout" of every LoRA unit without dropout: one stateless module shared by all, not one
#: per unit (each ``nn.Module`` costs about 2 KB, which counts with thousands of adapters loaded)
NO_DROPOUT = nn.Identity()


def _scaling(config: "LoRAConfig") -> float:
    return config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


class LoRAUnit(AdapterModule):
    """What every LoRA module shares: the scaling and merging through ``delta_weight``."""

    def __init__(self, config: "LoRAConfig"):
        super().__init__()
        self.scaling = _scaling(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else NO_DROPOUT
        self.gate: Optional[nn.Module] = None  # AdapterHub's use_gating (``gating.TokenGate``), set by the config

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover
        """The update in the host's weight layout."""
        raise NotImplementedError

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return weight + self.delta_weight().to(weight.dtype), bias


class LoRA(LoRAUnit):
    """``lora_A`` (r, in) and ``lora_B`` (out, r), the names PEFT and AdapterHub use. Reads the
    host's input; its contribution is the delta ``scaling * B(A(dropout(x)))``."""

    def __init__(self, config: "LoRAConfig", in_features: int, out_features: int, transposed: bool = False):
        super().__init__(config)
        self.transposed = transposed  # host stores its weight as (in, out), like transformers' Conv1D
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def init_nonzero(self) -> None:
        small_normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        xa = F.linear(self.dropout(h), self.lora_A)  # (B, T, in) -> (B, T, r)
        if self.gate is not None:  # AdapterHub: the gate (B, 1 or T, 1) replaces alpha / r
            return F.linear(xa, self.lora_B) * self.gate(h)
        return F.linear(xa, self.lora_B) * self.scaling  # (B, T, out)

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        if self.gate is not None:
            return None
        xa = F.linear(self.dropout(h), self.lora_A)  # (B, T, in) -> (B, T, r)
        return add_linear(base, xa, self.lora_B, scale=self.scaling * scale)  # (B, T, out)

    # -- batched per-example routing -----------------------------------------------------------
    def stack_key(self) -> Optional[Hashable]:
        if self.training and isinstance(self.dropout, nn.Dropout) or self.gate is not None:
            return None
        return (self.lora_A.shape[1], self.lora_B.shape[0])

    @classmethod
    def run_stacked(cls, units: Sequence["LoRA"], which: Optional[torch.Tensor], io: SlotIO) -> torch.Tensor:
        """Each routed example through its own LoRA in two batched matmuls (BGMV); ranks are
        padded with zeros to the largest, which adds exact zeros. ``which=None`` (``Parallel``):
        copy ``i`` of the batch through ``units[i]``, one matmul per projection over (k, B * T, d)."""
        h, base = units[0].read(io)
        n = base.shape[0] if which is not None else len(units)
        r = max(u.lora_A.shape[0] for u in units)
        a = gather([F.pad(u.lora_A, (0, 0, 0, r - u.lora_A.shape[0])) for u in units], which)  # (B, r, in)
        b = gather([F.pad(u.lora_B * u.scaling, (0, r - u.lora_B.shape[1])) for u in units], which)  # (B, out, r)
        xa = torch.bmm(h.reshape(n, -1, h.shape[-1]), a.transpose(1, 2))  # (B, T, r)
        return torch.baddbmm(base.reshape(n, -1, base.shape[-1]), xa, b.transpose(1, 2)).view(base.shape)


@dataclass(frozen=True)
class SlicedSite(Site):
    """A fused projection of which LoRA adapts some output slices: ``enabled[j]`` for slice ``j``
    of ``len(enabled)`` equal ones (GPT-2's ``c_attn``: q, k, v)."""

    enabled: tuple[bool, ...] = ()


class SlicedLoRA(LoRAUnit):
    """loralib's ``MergedLinear``: one rank-``r`` update per enabled output slice of a fused
    projection, zero elsewhere. ``lora_A`` (r * n, in) stacks the slices' ``A``, ``lora_B``
    (d * n, r) their ``B`` (``n`` enabled slices of width ``d``); slice ``j``'s delta is
    ``B_j @ A_j``, i.e. ``block_diag(B_1..B_n) @ lora_A`` on the enabled rows."""

    def __init__(self, config: "LoRAConfig", in_features: int, out_features: int, enabled: Sequence[bool],
                 transposed: bool = False):
        super().__init__(config)
        n, d = sum(enabled), out_features // len(enabled)
        self.transposed = transposed
        self.slice_width, self.out_features = d, out_features
        self.lora_A = nn.Parameter(torch.empty(config.r * n, in_features))
        self.lora_B = nn.Parameter(torch.zeros(d * n, config.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        rows = [torch.arange(j * d, (j + 1) * d) for j, on in enumerate(enabled) if on]
        self.register_buffer("rows", torch.cat(rows), persistent=False)  # the enabled output rows

    def init_nonzero(self) -> None:
        small_normal_(self.lora_B)

    def _b(self) -> torch.Tensor:
        return torch.block_diag(*self.lora_B.split(self.slice_width))  # (d * n, r * n)

    def delta_weight(self) -> torch.Tensor:
        part = (self._b() @ self.lora_A) * self.scaling  # (d * n, in)
        delta = part.new_zeros(self.out_features, part.shape[1]).index_copy(0, self.rows, part)  # (out, in)
        return delta.T if self.transposed else delta

    def _part(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(h), self.lora_A), self._b()) * self.scaling  # (B, T, d * n)

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return base.new_zeros(base.shape).index_copy(-1, self.rows, self._part(h))  # (B, T, out)

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        return base.index_add(-1, self.rows, self._part(h), alpha=scale)


class EmbeddingLoRA(LoRAUnit):
    """PEFT's ``lora.Embedding``: the ids pick columns of ``lora_embedding_A`` (r, num), then
    ``lora_embedding_B`` (dim, r); ``A`` starts at zero, ``B`` normal. No dropout (PEFT applies
    none: an id cannot be dropped partly)."""

    def __init__(self, config: "LoRAConfig", host: nn.Embedding):
        super().__init__(config)
        self.dropout = NO_DROPOUT
        self.padding_idx = host.padding_idx  # the host's: no gradient there
        self.lora_embedding_A = nn.Parameter(torch.zeros(config.r, host.num_embeddings))
        self.lora_embedding_B = nn.Parameter(torch.empty(host.embedding_dim, config.r))
        nn.init.normal_(self.lora_embedding_B)

    def init_nonzero(self) -> None:
        small_normal_(self.lora_embedding_A)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling  # (num, dim)

    def _a(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.lora_embedding_A.T, self.padding_idx)  # (B, T) -> (B, T, r)

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return F.linear(self._a(h), self.lora_embedding_B) * self.scaling  # (B, T, dim)

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        return add_linear(base, self._a(h), self.lora_embedding_B, scale=self.scaling * scale)

    def stack_key(self) -> Optional[Hashable]:
        return tuple(self.lora_embedding_A.shape[1:]) + tuple(self.lora_embedding_B.shape[:1]) + ("embedding",)

    @classmethod
    def run_stacked(cls, units: Sequence["EmbeddingLoRA"], which: Optional[torch.Tensor],
                    io: SlotIO) -> torch.Tensor:
        """Each example's ids index its own adapter's ``A`` (one gather over the stacked tables,
        no per-example copy of a table), then one batched matmul with its ``B``."""
        ids, base = units[0].read(io)
        n = base.shape[0]
        which = per_row(which, len(units), n, base.device)
        r = max(u.lora_embedding_A.shape[0] for u in units)
        tables = torch.stack([F.pad(u.lora_embedding_A, (0, 0, 0, r - u.lora_embedding_A.shape[0])).T
                              for u in units])  # (U, num, r)
        xa = tables[which.view(n, *([1] * (ids.dim() - 1))), ids].reshape(n, -1, r)  # (B, T, r)
        b = gather([F.pad(u.lora_embedding_B * u.scaling, (0, r - u.lora_embedding_B.shape[1])) for u in units],
                   which)  # (B, dim, r)
        return torch.baddbmm(base.reshape(n, -1, base.shape[-1]), xa, b.transpose(1, 2)).view(base.shape)


_CONVS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvLoRA(LoRAUnit):
    """PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d``: ``lora_A`` convolves with the host's kernel,
    stride, padding and dilation into ``r`` channels, ``lora_B`` is a 1x1 convolution back to the
    host's output channels. The delta kernel is ``B @ A`` over the rank (PEFT's
    ``get_delta_weight``)."""

    def __init__(self, config: "LoRAConfig", host: nn.modules.conv._ConvNd):
        super().__init__(config)
        k = tuple(host.kernel_size)
        self._conv = _CONVS[len(k)]
        self.stride, self.padding, self.dilation = host.stride, host.padding, host.dilation
        self.lora_A = nn.Parameter(torch.empty(config.r, host.in_channels, *k))
        self.lora_B = nn.Parameter(torch.zeros(host.out_channels, config.r, *([1] * len(k))))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def init_nonzero(self) -> None:
        small_normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A
        return (self.lora_B.flatten(1) @ a.flatten(1)).view(-1, *a.shape[1:]) * self.scaling  # (out, in, *k)

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        xa = self._conv(self.dropout(h), self.lora_A, None, self.stride, self.padding, self.dilation)  # (B, r, ...)
        return self._conv(xa, self.lora_B) * self.scaling  # (B, out, ...)


# -- the table of hosts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostKind:
    """One kind of layer LoRA can adapt: how to recognise it, its ``(in, out)`` widths, the
    largest rank it takes, its module, and whether its output has the features last (where a
    ``channel_gate`` strategy gates them)."""

    name: str
    matches: Callable[[nn.Module], bool]
    features: Callable[[nn.Module], tuple[int, int]]
    max_rank: Callable[[nn.Module], int]
    build: Callable[["LoRAConfig", Site], LoRAUnit]
    channels_last: bool = True


def _build_linear(config: "LoRAConfig", site: Site) -> LoRAUnit:
    transposed = linear_features(site.host)[2]
    if isinstance(site, SlicedSite) and site.enabled:
        return SlicedLoRA(config, site.in_features, site.out_features, site.enabled, transposed)
    return LoRA(config, site.in_features, site.out_features, transposed)


def _build_conv(config: "LoRAConfig", site: Site) -> LoRAUnit:
    host = site.host
    if host.groups != 1 or host.padding_mode != "zeros":
        raise AdapterError(
            f"LoRA cannot adapt '{site.place_id}' ({type(host).__name__} with groups={host.groups}, "
            f"padding_mode='{host.padding_mode}'): only convolutions with groups=1 and padding_mode='zeros' "
            "(PEFT's condition too). Target another module."
        )
    return ConvLoRA(config, host)


def _build_embedding(config: "LoRAConfig", site: Site) -> LoRAUnit:
    if site.host.max_norm is not None or site.host.sparse:
        raise AdapterError(f"LoRA cannot adapt '{site.place_id}': an nn.Embedding with max_norm or sparse=True "
                           "(its weight is renormalised in place / its gradient is sparse). Target another module.")
    return EmbeddingLoRA(config, site.host)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


HOSTS: tuple[HostKind, ...] = (
    HostKind("nn.Linear / transformers' Conv1D", lambda m: linear_features(m) is not None,
             lambda m: linear_features(m)[:2], lambda m: min(linear_features(m)[:2]), _build_linear),
    HostKind("nn.Embedding", lambda m: isinstance(m, nn.Embedding),
             lambda m: (m.num_embeddings, m.embedding_dim), lambda m: min(m.num_embeddings, m.embedding_dim),
             _build_embedding),
    HostKind("nn.Conv1d / Conv2d / Conv3d", _is_conv, lambda m: (m.in_channels, m.out_channels),
             lambda m: min(m.in_channels * math.prod(m.kernel_size), m.out_channels), _build_conv,
             channels_last=False),
)


def host_kind(module: nn.Module) -> Optional[HostKind]:
    """The ``HOSTS`` entry for ``module``, or ``None``."""
    return next((kind for kind in HOSTS if kind.matches(module)), None)


def _features(module: nn.Module) -> Optional[tuple[int, int]]:
    kind = host_kind(module)
    return None if kind is None else kind.features(module)


#: what ``Layout.weight_sites`` accepts as LoRA hosts
LORA_HOSTS = HostTypes(_features, ", ".join(kind.name for kind in HOSTS))
