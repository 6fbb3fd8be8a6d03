"""Training the base model's layer norms with an adapter (``train_layer_norms=True``).

Houlsby et al. 2019 (sec. 2.1) train "the layer normalization parameters" of each layer along
with the adapters. The base model must stay untouched (adapters off = the base bit for bit, two
adapters with their own norms routed per example in one batch), so the adapter holds *copies*:

* which norms: every ``LayerNorm`` / ``RMSNorm`` module inside the blocks the adapter covers,
  i.e. the blocks (layers) holding at least one of its sites (layout blocks; on the generic path,
  the module named up to the site's layer index, ``encoder.3`` for ``encoder.3.fc``). Norms
  outside the blocks (embeddings' norm, the final norm) are not taken;
* how: each copy is a ``weight``-place module on the norm (``LayerNormSite``) whose
  contribution replaces the norm's output by the same formula (the host's ``eps``, shape and,
  for ``transformers``' RMS norms, its float32 computation) with the adapter's weight and bias;
  ``add`` is its strategy whatever the adapter's own, and its fused path writes the recomputed
  norm itself, so a fresh copy reproduces the host's output exactly;
* an adapter that reads a post-LN model's norm (Pfeiffer reads ``norm(y + residual)``) reads its
  own copy there (``AdapterModule.layer_norm_of``);
* merging an adapter writes its copies into the norms (``merged``); unmerging restores them.

The copies are saved with the adapter (``adapter.<site>.weight`` / ``.bias``) and counted in its
parameters. ``NORMS`` is the table of norm formulas; a norm class none of them reproduces (checked
on a probe input when the copy is made) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, Feature, register_feature
from ..errors import AdapterError
from ..places.slots import Site
from ..strategies import make_strategy
from .base import AdapterModule

if TYPE_CHECKING:  # pragma: no cover
    from ..layouts import Layout

Formula = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _layer_norm(host: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.layer_norm(x, host.normalized_shape, weight, bias, host.eps)


def _rms_norm(host: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.rms_norm(x, host.normalized_shape, weight, host.eps)


def _hf_rms_norm(host: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``transformers``' RMS norms (Llama, Mistral, Qwen2/3, T5): computed in float32, scaled in
    the input's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + host.variance_epsilon)
    return weight * h.to(x.dtype)


@dataclass(frozen=True)
class Norm:
    """One kind of norm module and its formula ``(host, x, weight, bias) -> normalised x``."""

    name: str
    matches: Callable[[nn.Module], bool]
    formula: Formula


NORMS: tuple[Norm, ...] = (
    Norm("nn.LayerNorm", lambda m: isinstance(m, nn.LayerNorm), _layer_norm),
    Norm("nn.RMSNorm", lambda m: isinstance(m, nn.RMSNorm), _rms_norm),
    Norm("transformers RMSNorm (variance_epsilon)", lambda m: hasattr(m, "variance_epsilon")
         and isinstance(getattr(m, "weight", None), nn.Parameter) and getattr(m, "bias", None) is None, _hf_rms_norm),
)


def is_norm(module: nn.Module) -> bool:
    """A layer norm by type or by name (``LlamaRMSNorm``, ``T5LayerNorm``, ``nn.LayerNorm``)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@dataclass(frozen=True)
class LayerNormSite(Site):
    """The site of an adapter's copy of one of the model's layer norms."""


class LayerNormCopy(AdapterModule):
    """The adapter's ``weight`` (and ``bias``) of one layer norm, initialised from it. Reads the
    norm's input; the contribution is ``norm_copy(x) - norm(x)``, and the fused path
    (``add_to``) writes ``norm_copy(x)`` itself."""

    def __init__(self, host: nn.Module, place_id: str):
        super().__init__()
        kind = next((n for n in NORMS if n.matches(host)), None)
        if kind is None or getattr(host, "weight", None) is None:
            raise AdapterError(
                f"train_layer_norms: '{place_id}' is a {type(host).__name__}, a norm adapterkit has no formula for "
                f"(it knows {', '.join(n.name for n in NORMS)}, with a weight). Train the adapter without "
                "train_layer_norms on this model."
            )
        self._formula = kind.formula
        self._host = (host,)  # not a submodule: its eps / shape only
        self.weight = nn.Parameter(host.weight.detach().clone())
        bias = getattr(host, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone()) if isinstance(bias, torch.Tensor) else None
        self._check_formula(place_id)

    @torch.no_grad()
    def _check_formula(self, place_id: str) -> None:
        host = self._host[0]
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, 3, self.weight.shape[-1], generator=g).to(self.weight)
        if not torch.allclose(self.norm(x), host.forward(x), atol=1e-5, rtol=1e-4):
            raise AdapterError(
                f"train_layer_norms: '{place_id}' ({type(host).__name__}) does not compute the formula of its kind "
                "(a variant such as Gemma's 1 + weight?); adapterkit cannot copy it. Train without train_layer_norms."
            )

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The host's norm of ``x`` with this adapter's weight and bias."""
        return self._formula(self._host[0], x, self.weight, self.bias)

    def forward(self, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return self.norm(h) - base

    def add_to(self, base: torch.Tensor, h: torch.Tensor, scale: float) -> torch.Tensor:
        out = self.norm(h)
        return out if scale == 1.0 else base + scale * (out - base)

    def merged(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        """Merging writes the copies into the norm (the last merged adapter's win)."""
        return self.weight.to(weight.dtype), bias if self.bias is None else self.bias.to(bias.dtype)


def layer_norm_sites(layout: "Layout", sites: Sequence[Site]) -> list[LayerNormSite]:
    """The norms inside the blocks that ``sites`` cover (see the module docstring); an error
    when there are none."""
    names = {id(m): n for n, m in layout.model.named_modules()}
    blocks: dict[str, tuple[Optional[int], Optional[str]]] = {}  # block path -> (layer, stack)
    for site in sites:
        name = names.get(id(site.host))
        if name is None or site.layer is None:
            continue
        stack, layer, in_blocks = layout._position(name)
        if in_blocks:
            path = f"{stack.path}.{layer}"
        else:
            parts = name.split(".")
            path = ".".join(parts[: parts.index(str(layer)) + 1]) if str(layer) in parts else None
        if path is not None:
            blocks.setdefault(path, (layer, stack.name if stack is not None else None))
    if not blocks:
        raise AdapterError("train_layer_norms=True trains the layer norms of the layers an adapter sits in, but this "
                           "adapter covers no layer (its modules lie outside the model's blocks). Drop "
                           "train_layer_norms, or place the adapter inside the layers.")
    out: dict[str, LayerNormSite] = {}
    for path, (layer, stack) in blocks.items():
        for sub, module in layout.model.get_submodule(path).named_modules():
            if sub and is_norm(module):
                place_id = layout.place_id_for(f"{path}.{sub}")
                width = module.weight.shape[-1] if isinstance(getattr(module, "weight", None), torch.Tensor) else 0
                out.setdefault(place_id, LayerNormSite(place_id, module, width, width, layer=layer, place="weight",
                                                       stack=stack))
    if not out:
        raise AdapterError(f"train_layer_norms=True, but the layers this adapter covers ({', '.join(list(blocks)[:4])}"
                           f"{' ...' if len(blocks) > 4 else ''}) hold no LayerNorm / RMSNorm module; drop "
                           "train_layer_norms for this model.")
    return list(out.values())


def build_copy(site: LayerNormSite) -> LayerNormCopy:
    """The adapter's copy of the norm at ``site``, combined by a plain ``add``."""
    unit = LayerNormCopy(site.host, site.place_id)
    unit.strategy = make_strategy("add", site.out_features)
    return unit


def link_copies(sites: Sequence[Site], units: Mapping[str, nn.Module]) -> None:
    """Hand each module that reads one of the model's layer norms (``Site.layer_norm``) the
    adapter's copy of that norm, if the adapter has one."""
    copies = {id(s.host): units[s.key] for s in sites if isinstance(s, LayerNormSite)}
    for site in sites:
        copy = copies.get(id(site.layer_norm)) if site.layer_norm is not None else None
        if copy is not None and isinstance(units[site.key], AdapterModule):
            units[site.key].use_layer_norm_copy(copy)


class TrainLayerNorms(Feature):
    """``train_layer_norms=True`` on any method: the copies' sites, units and links."""

    def extra_sites(self, config: AdapterConfig, layout: "Layout", sites: Sequence[Site]) -> list[Site]:
        return list(layer_norm_sites(layout, sites)) if config.train_layer_norms else []

    def build(self, site: Site) -> Optional[nn.Module]:
        return build_copy(site) if isinstance(site, LayerNormSite) else None

    def link(self, sites: Sequence[Site], units: Mapping[str, nn.Module]) -> None:
        link_copies(sites, units)


register_feature(TrainLayerNorms())
