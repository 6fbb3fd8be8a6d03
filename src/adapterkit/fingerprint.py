"""A content fingerprint of a base model, so an adapter never loads silently into another base.

Shapes alone cannot tell two bases apart: an adapter trained on one BERT-small loads into any
other BERT-small, and gives wrong answers without a word. ``base_fingerprint`` hashes a fixed,
deterministic sample of the base weights: ``SAMPLES`` values at evenly strided positions of every
parameter it covers, rounded to bfloat16 and hashed as float32 bytes with their names and shapes
(sha256, first 16 hex digits). What it covers is versioned (``fingerprint_version`` in the saved
``base_model``; a checkpoint without one is version 1):

* **version 2** (written since): every parameter an adapter can touch or read: the whole backbone
  (``model.base_model``: embeddings, every block, final norms, pooler), named relative to it (so
  ``BertModel`` and ``BertForSequenceClassification`` of the same weights agree), plus the modules
  outside the backbone that the adapter occupies (a LoRA on ``lm_head``), named by their path. Not
  covered: a task head of the wrapped model that no adapter occupies (adapterkit's own heads are
  saved with the adapter);
* **version 1**: the parameters of the transformer blocks only (or the whole model on the generic
  path); a LoRA on the embeddings loaded silently onto a base with other embeddings. Still checked
  as such for checkpoints that recorded it, so they keep loading.

So the fingerprint is:

* the same after saving and loading the base, on every device, and for the base loaded in
  float32 or bfloat16 (float16 loses range and rounds differently: it gives another fingerprint);
* different for a base with other weights of the same shapes (fine-tuned, re-initialised, ...);
* computed on the original weights when adapters are merged into them.

``save_adapter`` records it with the base's name (``base_identity``); ``load_adapter`` refuses
a mismatch (``check_same_base``) unless ``strict_base=False`` (CLI ``--allow-other-base``).
Checkpoints written before fingerprints existed load as before.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .errors import CheckpointError

SAMPLES = 256
DIGITS = 16
VERSION = 2  # what the fingerprint covers (module docstring); recorded as ``fingerprint_version``


def _named_weights(model: nn.Module, layout: Any, version: int, hosts: Sequence[nn.Module]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The sampled tensors, with names that do not depend on the wrapper class."""
    if version >= 2:
        backbone = getattr(model, "base_model", model)
        inside = {id(m) for m in backbone.modules()}
        yield from backbone.named_parameters()
        paths = {id(m): name for name, m in model.named_modules()}
        for host in hosts:
            if id(host) not in inside and id(host) in paths:
                yield from host.named_parameters(prefix=f"<outside>.{paths[id(host)]}")
        return
    if layout is not None and getattr(layout, "blocks", None):
        for i, block in enumerate(layout.blocks):
            for name, p in block.named_parameters():
                yield f"{i}.{name}", p
        return
    for name, p in getattr(model, "base_model", model).named_parameters():
        yield name, p


@torch.no_grad()
def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    index = torch.arange(min(SAMPLES, n), device=flat.device) * (n // min(SAMPLES, n)) if n else None
    values = flat[index] if index is not None else flat
    return values.to(torch.bfloat16).to(torch.float32).cpu()


def base_fingerprint(model: nn.Module, layout: Any = None, *, version: int = VERSION,
                     hosts: Sequence[nn.Module] = ()) -> str:
    """The content fingerprint of ``model``'s weights (see the module docstring); ``hosts``: the
    modules an adapter occupies (those outside the backbone are covered too, from version 2)."""
    if version not in (1, 2):
        raise CheckpointError(f"Base fingerprint version {version} is newer than this adapterkit knows (1, 2); "
                              "upgrade adapterkit.")
    digest = hashlib.sha256()
    named = {name: p for name, p in _named_weights(model, layout, version, hosts)}
    for name, p in sorted(named.items(), key=lambda item: item[0]):
        if not p.is_floating_point():
            continue
        digest.update(f"{name}:{tuple(p.shape)};".encode())
        digest.update(_sample(p).numpy().tobytes())
    return digest.hexdigest()[:DIGITS]


def base_name(model: nn.Module) -> Optional[str]:
    """Where the base came from, as ``transformers`` recorded it (a folder or a hub name)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _hosts(sites: Optional[Sequence[Any]]) -> list[nn.Module]:
    return [s.host for s in sites or () if isinstance(getattr(s, "host", None), nn.Module)]


def base_identity(handle: Any, sites: Optional[Sequence[Any]] = None, *, version: int = VERSION) -> dict[str, Any]:
    """What ``save_adapter`` records about the base of an ``AdapterModel``: ``fingerprint``,
    ``fingerprint_version`` and ``name``; ``sites``: the adapter's (``Site``), whose hosts outside
    the backbone are covered too. Merged adapters are taken out while the original weights are
    sampled."""
    merged = bool(handle.merged_adapters)
    with handle.disable_adapters() if merged else contextlib.nullcontext():
        fingerprint = base_fingerprint(handle.model, handle.layout, version=version, hosts=_hosts(sites))
    return {"fingerprint": fingerprint, "fingerprint_version": version, "name": base_name(handle.model)}


def check_same_base(saved: dict[str, Any], handle: Any, directory: Any, *, strict: bool = True,
                    sites: Optional[Sequence[Any]] = None) -> None:
    """Refuse an adapter whose recorded base fingerprint differs from ``handle``'s base, computed
    as the checkpoint's ``fingerprint_version`` says (1 when it has none)."""
    want = saved.get("fingerprint")
    if not strict or not want:
        return
    version = saved.get("fingerprint_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{directory}: fingerprint_version {version!r} is not a number; the config was edited: "
                              "save the adapter again.")
    mine = base_identity(handle, sites, version=version)
    if mine["fingerprint"] == want:
        return
    raise CheckpointError(
        f"{directory} was trained on another base model ({saved.get('name') or 'unnamed'}, fingerprint {want}) than "
        f"this one ({mine['name'] or 'unnamed'}, fingerprint {mine['fingerprint']}): its outputs would be wrong. "
        "Load it into the base it was trained on, or pass strict_base=False (CLI --allow-other-base) to use it anyway."
    )


__all__ = ["VERSION", "base_fingerprint", "base_name", "base_identity", "check_same_base"]
