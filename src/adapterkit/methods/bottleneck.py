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

Presets: ``pfeiffer`` (= ``seq_bn``), ``houlsby`` (= ``double_seq_bn``), ``parallel`` (= ``par_bn``).

The up-projection accumulates into the residual in one GEMM, and at inference a Pfeiffer-shaped
adapter never writes the model's layer norm of ``y + residual`` (``fused.py``): the same
function with fewer passes over the activations, equal to the written-out formulas to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..slots import Site, SlotIO
from .fused import Folded, add_linear, fold_layer_norm, linear_of_layer_norm

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
INITS = ("mam_adapter", "bert", "houlsby")


@register_method("bottleneck")
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """A bottleneck adapter. The defaults are the Pfeiffer preset (AdapterHub ``SeqBnConfig``).

    Args:
        mh_adapter: place after the attention output (``attn_out``).
        output_adapter: place after the feed-forward output (``ffn_out``).
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
    """

    mh_adapter: bool = False
    output_adapter: bool = True
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
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.stochastic_depth < 1.0:
            raise AdapterError("dropout and stochastic_depth must be in [0, 1).")
        if self.target_modules is None and not (self.mh_adapter or self.output_adapter):
            raise AdapterError("Set mh_adapter=True and/or output_adapter=True (or target_modules=...).")

    def sites(self, layout) -> list[Site]:
        if self.target_modules is not None:
            return layout.generic_sites(self.target_modules, self.layers, self.leave_out, place="post")
        places = (["attn_out"] if self.mh_adapter else []) + (["ffn_out"] if self.output_adapter else [])
        return layout.sublayer_sites(places, self.layers, self.leave_out)

    def build(self, site: Site) -> nn.Module:
        reads = site.in_features if self.is_parallel and site.residual_from is None else site.out_features
        return Bottleneck(self, reads, site.out_features)

    def bottleneck_width(self, width: int) -> int:
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        return max(1, int(width // self.reduction_factor))


class Bottleneck(nn.Module):
    """``up(act(down(norm(h)))) * scaling``, placed around the host per the config."""

    def __init__(self, config: BottleneckConfig, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        width = config.bottleneck_width(out_features)
        self.norm_before = nn.LayerNorm(in_features) if config.norm_position == "pre" else None
        self.down = nn.Linear(in_features, width)
        self.act = ACTIVATIONS[config.non_linearity.lower()]()
        self.up = nn.Linear(width, out_features)
        self.norm_after = nn.LayerNorm(out_features) if config.norm_position == "post" else None
        self.dropout = nn.Dropout(config.dropout)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(out_features))
        else:
            self.scaling = float(config.scaling)
        # x * 1.0 == x bit for bit: decided once here, so the forward skips that pass
        self._scaled = not (isinstance(self.scaling, float) and self.scaling == 1.0)
        # Pfeiffer's shape: the down-projection reads the model's layer norm of (y + residual)
        # and the up-projection adds to y; see ``_inference_with_folded_norm``
        self._reads_model_norm = (not config.is_parallel and config.original_ln_before
                                  and config.residual_before_ln is True and config.norm_position is None
                                  and isinstance(self.scaling, float))
        self._folded: Optional[tuple[list, list, Folded]] = None  # (tensors read, their state, fold)
        self._init(config.init_weights)

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

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The bottleneck activations ``act(down(norm(h)))``: (B, T, d_in) -> (B, T, m)."""
        if self.norm_before is not None:
            h = self.norm_before(h)
        return self.act(self.down(h))

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter's own output (before any residual): (B, T, d_in) -> (B, T, d_out)."""
        out = self.up(self.hidden(h))
        if self._scaled:
            out = out * self.scaling
        p = self.config.stochastic_depth
        if p > 0.0 and self.training:
            keep = out.new_empty((out.shape[0],) + (1,) * (out.dim() - 1)).bernoulli_(1 - p)
            out = out * keep / (1 - p)
        return self.dropout(out)

    @property
    def _output_noise(self) -> bool:
        """Dropout or stochastic depth acts on the adapter's own output (training with either set)."""
        return self.training and (self.config.dropout > 0.0 or self.config.stochastic_depth > 0.0)

    def add_delta(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``residual + delta(h)``. Unless dropout or stochastic depth is at work (training with
        either set) or the scaling is a parameter, the up-projection accumulates straight into
        the residual (``fused.add_linear``): one pass over the output instead of three."""
        if self._output_noise or not isinstance(self.scaling, float):
            return residual + self.delta(h)
        return add_linear(residual, self.hidden(h), self.up.weight, self.up.bias, self.scaling)

    def _inference_with_folded_norm(self, io: SlotIO) -> Optional[torch.Tensor]:
        """The Pfeiffer shape at inference, ``y + up(act(down(norm(y + residual))))``, without
        writing ``norm(y + residual)`` (``fused.linear_of_layer_norm``) and with the output written
        over ``y + residual``, which nothing else reads. ``None`` where it does not apply."""
        norm = io.layer_norm
        # CPU only: the precision check reads a flag back from the device, a sync on a GPU
        if (torch.is_grad_enabled() or not self._reads_model_norm or io.residual is None
                or io.y.device.type != "cpu" or type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1
                or io.y.dtype not in (torch.float32, torch.float64) or io.y.dtype != self.down.weight.dtype
                or self._output_noise):
            return None
        s = (io.y + io.residual).contiguous()
        a = linear_of_layer_norm(s.view(-1, s.shape[-1]), norm.eps, self._fold(norm))
        if a is None:
            return None
        return add_linear(io.y, self.act(a), self.up.weight, self.up.bias, self.scaling, out=s)

    def _fold(self, norm: nn.LayerNorm) -> Folded:
        """``fold_layer_norm`` of the down-projection, kept until a tensor it reads changes: new
        storage (a new tensor, ``.to()``, ``.data = ...``) or an in-place write (an optimizer step
        or a load bumps ``_version``). The tensors are held with the fold, so a replaced one
        cannot hand its address to its successor."""
        tensors = [t for t in (self.down.weight, self.down.bias, norm.weight, norm.bias) if t is not None]
        state = [(t.data_ptr(), t._version, t.dtype) for t in tensors]
        if self._folded is None or self._folded[1] != state:
            self._folded = (tensors, state, fold_layer_norm(norm, self.down.weight, self.down.bias))
        return self._folded[2]

    def forward(self, io: SlotIO) -> torch.Tensor:
        cfg = self.config
        fast = self._inference_with_folded_norm(io)
        if fast is not None:
            return fast
        if cfg.is_parallel:
            source = io.residual if io.residual is not None else io.x
            if self.norm_after is not None:
                return io.y + self.norm_after(self.delta(source))
            return self.add_delta(io.y, source)
        h, residual = io.y, io.y
        if cfg.original_ln_before and io.residual is not None:
            h = h + io.residual
            if cfg.residual_before_ln == "post_add":
                residual = h
            if io.layer_norm is not None:
                h = io.layer_norm(h)
        if cfg.residual_before_ln is False:
            residual = h
        if self.norm_after is None:  # the residual goes in before or after a norm that is not there
            return self.add_delta(residual, h)
        if cfg.adapter_residual_before_ln:
            return self.norm_after(self.delta(h) + residual)
        return self.norm_after(self.delta(h)) + residual


PFEIFFER = BottleneckConfig()
HOULSBY = BottleneckConfig(mh_adapter=True, output_adapter=True, non_linearity="swish", original_ln_before=False)
PARALLEL = BottleneckConfig(is_parallel=True, original_ln_before=False, reduction_factor=2, scaling=4.0)
for _name, _cfg in (("pfeiffer", PFEIFFER), ("seq_bn", PFEIFFER), ("houlsby", HOULSBY),
                    ("double_seq_bn", HOULSBY), ("parallel", PARALLEL), ("par_bn", PARALLEL)):
    register_preset(_name, _cfg)
