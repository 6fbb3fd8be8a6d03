"""Bottleneck adapters: down-projection, non-linearity, up-projection, residual add.

Houlsby et al. 2019 (sec. 2.1, fig. 2), Pfeiffer et al. 2020 (AdapterFusion, sec. 3.1), and the
parallel adapter of He et al. 2021 (sec. 3, eq. 6). The options and their order of operations
follow AdapterHub ``adapters`` 1.3 (``BnConfig`` / ``Adapter.pre_forward`` / ``forward`` /
``post_forward``), so the same weights give the same outputs; the one difference is the default
``init_weights="mam_adapter"`` (up-projection zero), so that a fresh adapter leaves the model's
outputs unchanged. That holds for every preset; options that move the adapter's residual
(``residual_before_ln=False`` or ``"post_add"``, ``adapter_residual_before_ln=True`` with a
``"post"`` norm) change outputs from the start, exactly as they do in AdapterHub. The model's own
residual add and layer norm run after the adapter, exactly as ``original_ln_after=True`` asks;
hooks cannot skip them, so ``original_ln_after=False`` is refused.

Presets: ``pfeiffer`` (= ``seq_bn``), ``houlsby`` (= ``double_seq_bn``, and ``e_adapter``: the
E-adapters of ELP-adapter tuning, in every encoder layer), ``parallel`` (= ``par_bn``).

The up-projection accumulates into the residual in one GEMM, and at inference a Pfeiffer-shaped
adapter never writes the model's layer norm of ``y + residual`` (``fused.py``): the same
function with fewer passes over the activations, equal to the written-out formulas to rounding.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Union

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..places.slots import Site, SlotIO
from .base import AdapterModule, default_read, small_normal_
from .gating import gate_for
from .fused import Folded, add_linear, fold_layer_norm, layer_norm_stats, linear_of_layer_norm

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
INITS = ("mam_adapter", "bert", "houlsby")


@register_method("bottleneck")
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """A bottleneck adapter. The defaults are the Pfeiffer preset (AdapterHub ``SeqBnConfig``).

    Args:
        mh_adapter: place after the attention output (``attn_out``).
        output_adapter: place after the feed-forward output (``ffn_out``).
        cross_adapter: place after the cross-attention output (``cross_attn_out``, in the
            decoder of encoder-decoder models), as AdapterHub's ``BnConfig.cross_adapter``.
        reduction_factor: bottleneck width = hidden size // reduction_factor.
        bottleneck_dim: bottleneck width, overriding ``reduction_factor``.
        non_linearity: relu, gelu, swish (= silu) or tanh.
        dropout: dropout on the adapter's output.
        norm_position: a new LayerNorm ``"pre"`` (before the down-projection) or ``"post"``
            (after the up-projection), as NeMo's ``norm_position``; ``None`` for none.
        original_ln_before: apply the model's residual + layer norm before the adapter.
        original_ln_after: apply the model's residual + layer norm after the adapter (always).
        residual_before_ln: take the adapter's residual before the model's layer norm
            (``True``), after it (``False``), or after the residual add (``"post_add"``).
        adapter_residual_before_ln: add the residual before the ``"post"`` norm.
        is_parallel: read the sub-layer's input instead of its output (parallel adapter).
        scaling: factor on the adapter output: a float, ``"learned"`` (a scalar) or ``"channel"``.
        init_weights: ``"mam_adapter"`` (up-projection zero: identity at init), ``"bert"``
            (normal, std 0.02) or ``"houlsby"`` (truncated normal, std 0.01).
        use_gating: multiply the adapter's output (before a ``"post"`` norm) by a learned gate
            read from the adapter's input, AdapterHub's ``use_gating`` (UniPELT; ``gating.py``).
    """

    mh_adapter: bool = False
    output_adapter: bool = True
    cross_adapter: bool = False
    reduction_factor: float = 16
    bottleneck_dim: Optional[int] = None
    non_linearity: str = "relu"
    dropout: float = 0.0
    norm_position: Optional[str] = None
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: Union[bool, str] = True
    adapter_residual_before_ln: bool = False
    is_parallel: bool = False
    scaling: Union[float, str] = 1.0
    init_weights: str = "mam_adapter"
    use_gating: bool = False

    def validate(self) -> None:
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise AdapterError(
                f"non_linearity='{self.non_linearity}' is not supported; use one of {', '.join(ACTIVATIONS)}."
            )
        if self.init_weights not in INITS:
            raise AdapterError(f"init_weights='{self.init_weights}' is not supported; use one of {', '.join(INITS)}.")
        if self.bottleneck_dim is None and not self.reduction_factor > 0:
            raise AdapterError(f"reduction_factor must be > 0, got {self.reduction_factor}.")
        if self.bottleneck_dim is not None and self.bottleneck_dim < 1:
            raise AdapterError(f"bottleneck_dim must be >= 1, got {self.bottleneck_dim}.")
        if self.norm_position not in (None, "pre", "post"):
            raise AdapterError(f"norm_position must be 'pre', 'post' or None, got {self.norm_position!r}.")
        if self.residual_before_ln not in (True, False, "post_add"):
            raise AdapterError(f"residual_before_ln must be True, False or 'post_add', got {self.residual_before_ln!r}.")
        if not isinstance(self.scaling, (int, float)) and self.scaling not in ("learned", "channel"):
            raise AdapterError(f"scaling must be a number, 'learned' or 'channel', got {self.scaling!r}.")
        if not self.original_ln_after:
            raise AdapterError(
                "original_ln_after=False is not supported: adapterkit keeps the model's own residual add and "
                "layer norm (it hooks modules instead of copying model code). Use original_ln_after=True."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.target_modules is None and not (self.mh_adapter or self.output_adapter or self.cross_adapter):
            raise AdapterError("Set mh_adapter=True, output_adapter=True and/or cross_adapter=True (or target_modules=...).")

    def sites(self, layout) -> list[Site]:
        if self.target_modules is not None:
            return layout.generic_sites(self.target_modules, self.layers, self.leave_out, "post", self.stacks)
        chosen = {"attn_out": self.mh_adapter, "cross_attn_out": self.cross_adapter, "ffn_out": self.output_adapter}
        return layout.sublayer_sites([p for p, on in chosen.items() if on], self.layers, self.leave_out, self.stacks)

    def default_place(self) -> str:
        return "parallel" if self.is_parallel else "post"

    def build(self, site: Site) -> nn.Module:
        if site.place == "pre":  # rewrites the host's input
            return self.gated(Bottleneck(self, site.in_features, site.in_features), site)
        reads = site.in_features if site.place == "parallel" and site.residual_from is None else site.out_features
        return self.gated(Bottleneck(self, reads, site.out_features), site)

    def gated(self, unit: "Bottleneck", site: Site) -> "Bottleneck":
        """``unit`` with its gate where ``use_gating`` asks for one."""
        if self.use_gating:
            unit.gate = gate_for(site, unit.down.in_features)
        return unit

    def bottleneck_width(self, width: int) -> int:
        """``width // reduction_factor``; at least 1, with a warning where the factor exceeds the
        width (the CLI refuses that outright: ``train.loop``)."""
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        if width // self.reduction_factor < 1:
            warnings.warn(f"reduction_factor={self.reduction_factor} exceeds the width {width}: the bottleneck is "
                          "1 wide. Pass a smaller reduction_factor or bottleneck_dim=... to choose it.", stacklevel=2)
        return max(1, int(width // self.reduction_factor))


#: stateless modules every unit without dropout / with one activation shares, not one per unit (each
#: ``nn.Module`` costs about 2 KB, which counts with thousands of adapters loaded; docs/design.md)
NO_DROPOUT = nn.Identity()
_ACTIVATION_MODULES: dict[str, nn.Module] = {}


def _shared_activation(name: str) -> nn.Module:
    """The one module of activation ``name`` (stateless: no parameters, no training behaviour)."""
    if name not in _ACTIVATION_MODULES:
        _ACTIVATION_MODULES[name] = ACTIVATIONS[name]()
    return _ACTIVATION_MODULES[name]


class Bottleneck(AdapterModule):
    """``up(act(down(norm(h)))) * scaling``: a delta, read where the config says (see ``read``)."""

    def __init__(self, config: BottleneckConfig, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        width = config.bottleneck_width(out_features)
        self.norm_before = nn.LayerNorm(in_features) if config.norm_position == "pre" else None
        self.down = nn.Linear(in_features, width)
        self.act = _shared_activation(config.non_linearity.lower())
        self.up = nn.Linear(width, out_features)
        self.norm_after = nn.LayerNorm(out_features) if config.norm_position == "post" else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else NO_DROPOUT
        self.gate: Optional[nn.Module] = None  # use_gating's ``gating.TokenGate`` (``BottleneckConfig.gated``)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(out_features))
        else:
            self.scaling = float(config.scaling)
        # x * 1.0 == x bit for bit: decided once here, so the forward skips that pass
        self._scaled = not (isinstance(self.scaling, float) and self.scaling == 1.0)
        # Pfeiffer's shape: the down-projection reads the model's layer norm of (y + residual)
        # and the up-projection adds to y; see ``fused_site``
        self._reads_model_norm = (not config.is_parallel and config.original_ln_before
                                  and config.residual_before_ln is True and config.norm_position is None
                                  and isinstance(self.scaling, float))
        self._foldable = False  # fused_site's structural conditions at this unit's site (compile_at)
        self._folded: Optional[tuple[list, list, Folded]] = None  # (tensors read, their state, fold)
        self._stacks: dict = {}  # run_stacked's stacked weights, by adapter set (``_stacked``)
        self._init(config.init_weights)

    def __getstate__(self) -> dict:
        """A copy or pickle starts without the kept stacks (they hold weak references)."""
        return {**super().__getstate__(), "_stacks": {}}

    @torch.no_grad()
    def _init(self, scheme: str) -> None:
        if scheme == "mam_adapter":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        elif scheme == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:  # houlsby
            for w in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)

    def init_nonzero(self) -> None:
        small_normal_(self.up.weight)

    def read(self, io: SlotIO) -> tuple[torch.Tensor, torch.Tensor]:
        """At a ``post`` place, AdapterHub's ``pre_forward``: with ``original_ln_before`` the adapter
        reads the model's layer norm of ``y + residual``; ``residual_before_ln`` picks what the
        delta is added to. Other places read as ``default_read``."""
        if io.place != "post":
            return default_read(io)
        cfg = self.config
        h = base = io.y
        if cfg.original_ln_before and io.residual is not None:
            h = h + io.residual
            if cfg.residual_before_ln == "post_add":
                base = h
            norm = self.layer_norm_of(io)  # the model's, or the adapter's copy (train_layer_norms)
            if norm is not None:
                h = norm(h)
        if cfg.residual_before_ln is False:
            base = h
        return h, base

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The bottleneck activations ``act(down(norm(h)))``: (B, T, d_in) -> (B, T, m)."""
        if self.norm_before is not None:
            h = self.norm_before(h)
        return self.act(self.down(h))

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The adapter's own output, (B, T, d_in) -> (B, T, d_out). With a ``"post"`` norm and
        ``adapter_residual_before_ln`` the norm reads ``delta + base``, so the contribution is
        ``norm(delta + base) - base``."""
        out = self.up(self.hidden(h))
        if self._scaled:
            out = out * self.scaling
        out = self.dropout(out)
        if self.gate is not None:  # AdapterHub: after dropout, before the "post" norm
            out = out * self.gate(h)
        if self.norm_after is None:
            return out
        if self.config.adapter_residual_before_ln and not self.config.is_parallel:
            return self.norm_after(out + base) - base
        return self.norm_after(out)

    @property
    def _output_noise(self) -> bool:
        """Dropout acts on the adapter's own output (training with dropout set)."""
        return self.training and self.config.dropout > 0.0

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        """``base + scale * delta`` with the up-projection accumulated straight into the base
        (``fused.add_linear``): one pass over the output instead of three."""
        if self._output_noise or self.norm_after is not None or not isinstance(self.scaling, float) \
                or self.gate is not None:
            return None
        return add_linear(base, self.hidden(h), self.up.weight, self.up.bias, self.scaling * scale)

    def fused_site(self, io: SlotIO, scale: float) -> Optional[torch.Tensor]:
        """The Pfeiffer shape at inference, ``y + up(act(down(norm(y + residual))))``, without
        writing ``norm(y + residual)`` (``fused.linear_of_layer_norm``) and with the output written
        over ``y + residual``, which nothing else reads. ``None`` where it does not apply."""
        if not self._can_fold(io):
            return None
        norm = io.layer_norm
        s = (io.y + io.residual).contiguous()
        a = linear_of_layer_norm(s.view(-1, s.shape[-1]), norm.eps, self._fold(norm))
        if a is None:
            return None
        return add_linear(io.y, self.act(a), self.up.weight, self.up.bias, self.scaling * scale, out=s)

    def compile_at(self, site: Site) -> None:
        """Decide once, when the plans are compiled, whether the site allows ``fused_site``: the
        Pfeiffer shape at a ``post`` place with a residual, reading the model's own one-axis
        ``nn.LayerNorm`` (not a ``train_layer_norms`` copy)."""
        norm = site.layer_norm
        self._foldable = (self._reads_model_norm and self.gate is None and site.place == "post" and site.residual_from is not None
                          and not self._layer_norm_copy and type(norm) is nn.LayerNorm
                          and len(norm.normalized_shape) == 1)

    def _can_fold(self, io: SlotIO) -> bool:
        """Whether ``fused_site`` may fold the model's layer norm in this call (before its precision
        check): a foldable site (``compile_at``), and what may change between calls: inference
        (no autograd, no dropout), a CPU tensor (the precision check reads a flag back from the
        device, a sync on a GPU) of the adapter's float dtype."""
        return (self._foldable and not torch.is_grad_enabled() and not self._output_noise and io.residual is not None
                and io.y.device.type == "cpu" and io.y.dtype in (torch.float32, torch.float64)
                and io.y.dtype == self.down.weight.dtype)

    def _fold(self, norm: nn.LayerNorm) -> Folded:
        """``fold_layer_norm`` of the down-projection, kept until a tensor it reads changes: new
        storage (a new tensor, ``.to()``, ``.data = ...``) or an in-place write (an optimizer step
        or a load bumps ``_version``). The tensors are held with the fold, so a replaced one
        cannot hand its address to its successor."""
        tensors = [t for t in (self.down.weight, self.down.bias, norm.weight, norm.bias) if t is not None]
        if any(t.is_inference() for t in tensors):  # computed under inference_mode (Compacter's PHM
            return fold_layer_norm(norm, self.down.weight, self.down.bias)  # weights): no version to key on
        state = [(t.data_ptr(), t._version, t.dtype) for t in tensors]
        if self._folded is None or self._folded[1] != state:
            self._folded = (tensors, state, fold_layer_norm(norm, self.down.weight, self.down.bias))
        return self._folded[2]

    # -- batched per-example routing -----------------------------------------------------------
    def stack_key(self) -> Optional[Hashable]:
        if self.norm_before is not None or self.norm_after is not None or not isinstance(self.scaling, float) \
                or self._output_noise or self._layer_norm_copy or self.gate is not None:
            return None
        cfg = self.config
        return (self.down.in_features, self.down.out_features, self.up.out_features, cfg.non_linearity.lower(),
                cfg.is_parallel, cfg.original_ln_before, cfg.residual_before_ln)

    def _up_with_bias(self) -> torch.Tensor:
        """``[W * scaling | b * scaling]``, (d_out, m + 1): the up-projection with its bias as
        one more column, so that a batched matmul adds the bias too."""
        w, b = self.up.weight, self.up.bias.unsqueeze(1)
        if self._scaled:
            w, b = w * self.scaling, b * self.scaling
        return torch.cat([w, b], 1)

    @classmethod
    def _stacked(cls, units: Sequence["Bottleneck"], norm: Optional[nn.LayerNorm]) -> tuple[torch.Tensor, ...]:
        """The per-adapter tensors ``run_stacked`` gathers from, stacked along a new first axis
        (one row per adapter): ``[W_up * s | b_up * s]``, then the folds of ``norm`` (``_fold``)
        or, without ``norm``, the down-projection's weight and bias.

        Where autograd records (training) they are stacked anew in every call, so gradients
        reach each adapter. Otherwise they are kept on the first unit, per adapter set and
        norm, until a tensor they read changes, as ``_fold`` decides (new storage, an in-place
        write, another dtype): routed inference stops copying every adapter's weights per layer
        and per call. Up to four adapter sets are kept per first unit."""

        def build() -> tuple[torch.Tensor, ...]:
            up = torch.stack([u._up_with_bias() for u in units])  # (n, d_out, m + 1)
            if norm is not None:
                folds = [u._fold(norm) for u in units]
                return (up, *(torch.stack([f[i] for f in folds]) for i in range(3)))
            return up, torch.stack([u.down.weight for u in units]), torch.stack([u.down.bias for u in units])

        read = [t for u in units for t in u.parameters()]
        if norm is not None:
            read += [t for t in (norm.weight, norm.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in read):
            return build()
        key = (tuple(id(u) for u in units), id(norm) if norm is not None else None)
        state = [(t.data_ptr(), t._version, t.dtype) for t in read]
        cache = units[0]._stacks
        kept = cache.get(key)
        if kept is None or kept[1] != state:
            if len(cache) >= 4:
                cache.clear()
            # the tensors read are held (no address reuse); the entry goes when any other unit of
            # the set does (a deleted adapter's weights and their stacked copy are freed with it)
            drop = _dropper(cache, key)
            kept = cache[key] = (read, state, build(), [weakref.ref(u, drop) for u in units[1:]])
        return kept[2]

    @classmethod
    def run_stacked(cls, units: Sequence["Bottleneck"], which: Optional[torch.Tensor], io: SlotIO) -> torch.Tensor:
        """Every routed example through its own adapter, one batched matmul per projection. At
        inference the Pfeiffer shape folds the model's layer norm as ``fused_site`` does, with each
        adapter's fold gathered per example, and writes its output over ``y + residual``. The
        stacked weights are kept between calls at inference (``_stacked``). ``which=None``
        (``Parallel``): copy ``i`` of the batch through ``units[i]``, the stacked weights used as
        they are, one matmul per projection over (k, B * T, d)."""
        first = units[0]
        n = io.passthrough.shape[0] if which is not None else len(units)

        def pick(stacked: torch.Tensor) -> torch.Tensor:  # one row per unit -> each example's row
            return stacked if which is None else stacked.index_select(0, which)

        if first._can_fold(io):
            s = (io.y + io.residual).contiguous()
            stats = layer_norm_stats(s, io.layer_norm.eps)
            if stats is not None:
                mean, rstd = stats  # (B, T, 1) each
                ups, wg_ts, wg_sums, shifts = cls._stacked(units, io.layer_norm)
                up = pick(ups)  # (B, d_out, m + 1); (k, ...) for Parallel's copies
                wg_t = pick(wg_ts)  # (B, d_in, m)
                wg_sum = pick(wg_sums).unsqueeze(1)  # (B, 1, m)
                shift = pick(shifts).unsqueeze(1)  # (B, 1, m)
                s3 = s.view(n, -1, s.shape[-1])
                z = torch.bmm(s3, wg_t).sub_(mean.view(n, -1, 1) * wg_sum).mul_(rstd.view(n, -1, 1)).add_(shift)
                y3 = io.y.reshape(n, -1, io.y.shape[-1])
                return torch.baddbmm(y3, _with_ones(first.act(z)), up.transpose(1, 2), out=s3).view(io.y.shape)
        ups, downs_w, downs_b = cls._stacked(units, None)
        up = pick(ups)  # (B, d_out, m + 1)
        h, base = first.read(io)
        h3, base3 = h.reshape(n, -1, h.shape[-1]), base.reshape(n, -1, base.shape[-1])  # (B, T, d)
        down_w = pick(downs_w)  # (B, m, d_in)
        down_b = pick(downs_b).unsqueeze(1)  # (B, 1, m)
        z = first.act(torch.baddbmm(down_b, h3, down_w.transpose(1, 2)))  # (B, T, m)
        return torch.baddbmm(base3, _with_ones(z), up.transpose(1, 2)).view(base.shape)


def _dropper(cache: dict, key: tuple) -> Callable[[object], None]:
    """A weakref callback removing ``key`` from ``cache``."""
    return lambda _ref: cache.pop(key, None)


def _with_ones(z: torch.Tensor) -> torch.Tensor:
    """``z`` with a column of ones appended: (..., m) -> (..., m + 1)."""
    return torch.cat([z, z.new_ones(z.shape[:-1] + (1,))], -1)


PFEIFFER = BottleneckConfig()
HOULSBY = BottleneckConfig(mh_adapter=True, output_adapter=True, non_linearity="swish", original_ln_before=False)
PARALLEL = BottleneckConfig(is_parallel=True, original_ln_before=False, reduction_factor=2, scaling=4.0)
for _name, _cfg in (("pfeiffer", PFEIFFER), ("seq_bn", PFEIFFER), ("houlsby", HOULSBY),
                    ("double_seq_bn", HOULSBY), ("parallel", PARALLEL), ("par_bn", PARALLEL),
                    ("e_adapter", HOULSBY)):  # ELP's E-adapters: after attention and FFN of every encoder layer
    register_preset(_name, _cfg)
