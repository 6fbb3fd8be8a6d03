"""Folding weight-level adapters (LoRA, IA3) into the base weights, and undoing it exactly.

``Merges`` owns what merging needs: the order in which adapters were merged and, for each
weight a merged adapter touches, the original weight and bias, kept aside (one copy per
weight). ``apply`` writes the originals back and then, unless adapters are disabled, every
merged adapter in order, each through its module's ``merged(weight, bias)``. Unmerging is
therefore exact (the originals come back bit for bit), where subtracting the delta would leave
rounding behind (PEFT's way).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import nn

from .errors import AdapterError
from .quantization import check_mergeable

if TYPE_CHECKING:  # pragma: no cover
    from .records import AdapterRecord


class Merges:
    def __init__(self) -> None:
        self.order: list[str] = []
        self._originals: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.order

    def __bool__(self) -> bool:
        return bool(self.order)

    def merge(self, record: "AdapterRecord", base: Optional[nn.Module] = None) -> None:
        """Keep the originals of the weights ``record`` touches and mark it merged (call
        ``apply`` next). A weight that ``base`` shares between modules (GPT-2's input embeddings
        tied to its LM head) is refused: merging would change the other module too."""
        config = record.config
        why = config.merge_refusal()
        if why is not None:
            raise AdapterError(f"Adapter '{record.name}' ({config.method}) cannot be merged: {why}.")
        if record.name in self.order:
            raise AdapterError(f"Adapter '{record.name}' is already merged.")
        if base is not None:
            _refuse_tied(record, base)
        check_mergeable(record.name, record.sites)
        for site in record.sites:
            if site.place_id not in self._originals:
                bias = getattr(site.host, "bias", None)
                self._originals[site.place_id] = (
                    site.host.weight.detach().clone(),
                    bias.detach().clone() if isinstance(bias, torch.Tensor) else None,
                )
        self.order.append(record.name)

    def unmerge(self, name: str) -> None:
        if name not in self.order:
            raise AdapterError(f"Adapter '{name}' is not merged.")
        self.order.remove(name)

    @torch.no_grad()
    def apply(self, records: Mapping[str, "AdapterRecord"], *, disabled: bool) -> None:
        """Write original weights, then (unless disabled) every merged adapter in merge order.
        A weight no merged adapter touches any more gets its original back and is forgotten."""
        sites = {site.place_id: site for record in records.values() for site in record.sites}
        for place_id, (weight, bias) in list(self._originals.items()):
            site = sites.get(place_id)
            merged = [n for n in self.order if site is not None and site.key in records[n].modules]
            if site is not None:
                w, b = weight, bias
                if not disabled:
                    for name in merged:
                        w, b = records[name].modules[site.key].merged(w, b)
                site.host.weight.copy_(w)
                if b is not None:
                    site.host.bias.copy_(b)
            if not merged:
                del self._originals[place_id]


def _refuse_tied(record: "AdapterRecord", base: nn.Module) -> None:
    weights = {id(site.host.weight): site.place_id for site in record.sites}
    owners: dict[int, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        if id(param) in weights:
            owners.setdefault(id(param), []).append(name)
    tied = {weights[k]: names for k, names in owners.items() if len(names) > 1}
    if tied:
        place, names = next(iter(tied.items()))
        raise AdapterError(
            f"Adapter '{record.name}' cannot be merged: the weight at '{place}' is shared by {names} (tied "
            "embeddings), so merging would change all of them, unlike the unmerged adapter. Keep it unmerged.")
