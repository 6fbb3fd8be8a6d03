"""LoRA initialised from the host's weight: PiSSA and OLoRA (PEFT's ``init_lora_weights``).

* ``pissa`` (Meng et al. 2024, "PiSSA: Principal Singular values and Singular vectors
  Adaptation", sec. 3): ``W = U S V^T``; ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``
  (``s`` = LoRA's scaling), so ``s B A`` is ``W``'s best rank-``r`` part;
* ``olora`` (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation"): ``W = Q R``;
  ``B = Q[:, :r]``, ``A = R[:r]``.

PEFT then subtracts ``s B0 A0`` from the base weight (the *residual* model) and trains ``A``,
``B`` on it. adapterkit never changes the base: the module keeps ``B0``, ``A0`` (frozen,
saved) and contributes ``s (B A - B0 A0) x``, which is the same function (``W_res x + s B A x``),
exactly zero at init. So

* **merge** folds ``s (B A - B0 A0)`` into the untouched weight, and unmerging restores it bit
  for bit, like any LoRA;
* **save** (adapterkit's format) writes ``lora_A``, ``lora_B`` and the initial ``lora_A_init``,
  ``lora_B_init``: the folder loads on the *unmodified* base model;
* **export** (PEFT / AdapterHub) writes the rank-``2r`` plain LoRA ``[B, -B0] @ [A; A0]`` with the
  scaling kept (``alpha`` doubled, or times ``sqrt 2`` with rsLoRA): PEFT's own conversion
  (``save_pretrained(path_initial_model_for_weight_conversion=...)``), loadable by both peers on
  the unmodified base. A PEFT folder still marked ``init_lora_weights: "pissa"`` needs PEFT's
  residual base and is refused.

The initialisations are one table, ``INITS``; a new one is one function there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Hashable, Optional

import torch
import torch.nn.functional as F

from .lora_layers import LoRA

if TYPE_CHECKING:  # pragma: no cover
    from .lora import LoRAConfig


def _pissa(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]  # A (r, in), B (out, r)


def _olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, rr = torch.linalg.qr(weight)  # (out, k), (k, in)
    return rr[:r].contiguous(), q[:, :r].contiguous()


#: ``init_weights`` name -> ``(A, B)`` from the host's (out, in) weight in float32, rank, scaling
INITS: dict[str, Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]] = {
    "pissa": _pissa,
    "olora": _olora,
}


class ResidualLoRA(LoRA):
    """A LoRA whose contribution is ``s (B A - B0 A0) x``: ``lora_A`` / ``lora_B`` start at the
    host's principal part (``INITS``), ``lora_A_init`` / ``lora_B_init`` keep it (frozen, saved)."""

    def __init__(self, config: "LoRAConfig", in_features: int, out_features: int, transposed: bool,
                 weight: torch.Tensor):
        super().__init__(config, in_features, out_features, transposed)
        w = (weight.T if transposed else weight).detach().to(torch.float32)  # (out, in)
        a, b = INITS[config.init_weights](w, config.r, self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        # same memory layout as the parameters, so that B A x and B0 A0 x round alike: exactly 0 at init
        self.register_buffer("lora_A_init", a.clone(memory_format=torch.contiguous_format))
        self.register_buffer("lora_B_init", b.clone(memory_format=torch.contiguous_format))

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A - self.lora_B_init @ self.lora_A_init) * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        trained = F.linear(F.linear(self.dropout(h), self.lora_A), self.lora_B)  # (B, T, out)
        initial = F.linear(F.linear(h, self.lora_A_init), self.lora_B_init)  # PEFT: W_res sees no dropout
        return (trained - initial) * self.scaling

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
        return None

    def stack_key(self) -> Optional[Hashable]:
        return None


def as_plain_lora(config: "LoRAConfig", sites: dict[str, dict[str, torch.Tensor]]):
    """``(config, sites)`` of the plain rank-``2r`` LoRA equal to a PiSSA / OLoRA adapter on the
    unmodified base (see the module docstring); a plain LoRA is returned as it is."""
    if config.init_weights == "lora":
        return config, sites
    out = {}
    for place, params in sites.items():
        out[place] = {"lora_A": torch.cat([params["lora_A"], params["lora_A_init"]]),
                      "lora_B": torch.cat([params["lora_B"], -params["lora_B_init"]], dim=1)}
    factor = math.sqrt(2.0) if config.use_rslora else 2.0  # keeps alpha / r (or alpha / sqrt r) unchanged
    double = lambda p: None if p is None else {k: 2 * v for k, v in p.items()}  # noqa: E731
    times = lambda p: None if p is None else {k: factor * v for k, v in p.items()}  # noqa: E731
    plain = dataclasses.replace(config, init_weights="lora", r=2 * config.r, alpha=factor * config.alpha,
                                rank_pattern=double(config.rank_pattern), alpha_pattern=times(config.alpha_pattern))
    return plain, out
