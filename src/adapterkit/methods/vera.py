"""VeRA: frozen random low-rank matrices shared by every layer, trained scaling vectors.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", sec. 3.1: one pair of
random matrices ``A`` (r, in_max) and ``B`` (out_max, r), drawn once from a seed and frozen, is
shared by all adapted layers; each layer trains two vectors only, ``d`` (r,) and ``b`` (out,)::

    delta W = diag(b) B[:out] diag(d) A[:, :in]      # b = 0 at init: the identity

``A`` and ``B`` are drawn as PEFT draws them (``tuners/vera/model.py``: one ``torch.Generator``
seeded with ``projection_prng_key``, Kaiming-uniform ``A`` then ``B``, each as large as the largest
adapted layer, sliced per layer), so an adapter is its seed plus the vectors: ``save_adapter``
writes the vectors only and the matrices are drawn again on loading (PEFT's
``save_projection=False``); a PEFT folder's saved matrices are checked against the draw.
The matrices are buffers, views of one tensor per adapter: shared in memory, never trained.
Mergeable (``W + delta W``), on Linear layers and GPT-2's ``Conv1D``.

``full_scaling=True`` is AdapterHub's VeRA (``adapters`` 1.x, ``methods/lora.py`` ``Vera``):
``d`` and ``b`` are full matrices, ``vera_lambda_d`` (r, r) and ``vera_lambda_b`` (out, out),
diagonal at init (``d_initial`` and zero), ``delta W = Lb B Ld A``; and since AdapterHub saves its
random matrices (``shared_parameters.<name>.lora_A`` / ``lora_B``, not drawn from a seed), such an
adapter saves ``vera_A`` / ``vera_B`` too, so a loaded one computes with the file's matrices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, register_method, register_preset
from ..errors import AdapterError
from ..layouts import linear_features
from ..places.slots import Site
from .base import AdapterModule, small_normal_

__all__ = ["VeRAConfig", "VeRA", "draw_projections"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: uniform in ``+-sqrt(3) * sqrt(2) / sqrt(fan_in)``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(seed: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared ``A`` (r, in_max) and ``B`` (out_max, r), drawn as PEFT draws them."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_uniform((r, in_max), generator)
    return a, _kaiming_uniform((out_max, r), generator)


@register_method("vera")
@dataclass(frozen=True)
class VeRAConfig(AdapterConfig):
    """VeRA on Linear layers (PEFT's option names in brackets).

    Args:
        r: rank of the shared random matrices (``r``; they are frozen, so a large ``r`` costs
            memory, not trainable parameters).
        projection_prng_key: the seed the shared matrices are drawn from (``projection_prng_key``).
        d_initial: the initial value of every entry of ``d`` (``d_initial``).
        dropout: dropout on the adapter branch's input (``vera_dropout``).
        roles: layout roles to adapt, as LoRA's (``None``: query and value).
        full_scaling: AdapterHub's form (module docstring): full ``(r, r)`` and ``(out, out)``
            scaling matrices instead of vectors, and the random matrices saved with the adapter.
    """

    supports_merge = True
    places = ("weight",)
    #: ``adapterkit train``'s default: on SST-2 dev (MiniLM, 3 epochs) 1e-2 beat 2e-3 (86.70 against
    #: 85.20 %); the paper trains its vectors at 4e-3-1e-2 for many more epochs
    training_lr = 1e-2
    default_roles: ClassVar[tuple[str, ...]] = ("q", "v", "cross_q", "cross_v")

    r: int = 256
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    roles: Optional[tuple[str, ...]] = None
    full_scaling: bool = False

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterError(f"VeRA rank r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}.")

    def sites(self, layout) -> list[Site]:
        return layout.weight_sites(self)

    def build_units(self, sites: Sequence[Site]) -> nn.ModuleDict:
        """Draw the shared matrices once, as large as the largest site, then build each site's module."""
        weights = [s for s in sites if linear_features(s.host) is not None]
        if weights:
            shared = draw_projections(self.projection_prng_key, self.r, max(s.in_features for s in weights),
                                      max(s.out_features for s in weights))
            drawing = dataclasses.replace(self)
            object.__setattr__(drawing, "_shared", shared)  # this build only; the user's config is untouched
            return AdapterConfig.build_units(drawing, sites)
        return super().build_units(sites)

    def build(self, site: Site) -> nn.Module:
        feats = linear_features(site.host)
        if feats is None:
            raise AdapterError(f"VeRA adapts Linear layers (and GPT-2's Conv1D) only; '{site.place_id}' is a "
                               f"{type(site.host).__name__}. Choose other roles or target_modules.")
        shared = getattr(self, "_shared", None)  # None: one site alone (a shape check), drawn for it
        a, b = shared if shared is not None else draw_projections(self.projection_prng_key, self.r,
                                                                  site.in_features, site.out_features)
        return VeRA(self, a[:, :site.in_features], b[:site.out_features], transposed=feats[2])


class VeRA(AdapterModule):
    """``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,), PEFT's names; ``vera_A`` / ``vera_B``
    are non-persistent views of the adapter's shared matrices."""

    def __init__(self, config: VeRAConfig, a: torch.Tensor, b: torch.Tensor, transposed: bool = False):
        super().__init__()
        self.transposed = transposed  # host stores its weight as (in, out), like transformers' Conv1D
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.full = config.full_scaling  # AdapterHub's form: the matrices are saved too
        self.register_buffer("vera_A", a, persistent=self.full)  # (r, in)
        self.register_buffer("vera_B", b, persistent=self.full)  # (out, r)
        d = torch.full((config.r,), float(config.d_initial))
        self.vera_lambda_d = nn.Parameter(torch.diag(d) if self.full else d)  # (r, r) or (r,)
        self.vera_lambda_b = nn.Parameter(torch.zeros((b.shape[0],) * (2 if self.full else 1)))  # (out, out) or (out,)

    def init_nonzero(self) -> None:
        small_normal_(self.vera_lambda_b)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The state dict; with ``full_scaling`` each site's own copy of its slices of the shared
        matrices (they are views of one tensor, which safetensors would refuse)."""
        state = self.state_dict()
        return {k: v.clone() if k in ("vera_A", "vera_B") else v for k, v in state.items()}

    def delta_weight(self) -> torch.Tensor:
        if self.full:
            delta = self.vera_lambda_b @ self.vera_B @ self.vera_lambda_d @ self.vera_A  # (out, in)
        else:
            delta = (self.vera_lambda_b[:, None] * self.vera_B) @ (self.vera_lambda_d[:, None] * self.vera_A)
        return delta.T if self.transposed else delta

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return weight + self.delta_weight().to(weight.dtype), bias

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        xa = F.linear(self.dropout(h), self.vera_A)  # (B, T, r)
        if self.full:
            return F.linear(F.linear(F.linear(xa, self.vera_lambda_d), self.vera_B), self.vera_lambda_b)  # (B, T, out)
        return F.linear(xa * self.vera_lambda_d, self.vera_B) * self.vera_lambda_b  # (B, T, out)


register_preset("vera", VeRAConfig())
