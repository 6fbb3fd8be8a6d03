"""Saving and loading one adapter with its head: what is written beside the weights, and every
check a load makes before the model changes.

``save_adapter`` writes ``adapter_config.json`` (the config, the places, the base model's
shape, content fingerprint and host weight shapes, the head's config) and
``adapter_model.safetensors`` (``adapter.<site>.*``, ``head.*``) atomically
(``checkpoint_format.py``), or another library's folder (``interop``). ``read_adapter`` reads
any of them (the PEFT and AdapterHub readers produce the same metadata and tensors), checks the
config, the base's shape, the places, the host weight shapes and the fingerprint, and returns
the adapter's record and head built and loaded, but not attached: a failed load changes nothing.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Optional

from ._version import __version__
from .checkpoint_format import check_base_shape, load_exact, read_checkpoint, write_checkpoint
from .config import config_from_dict
from .errors import AdapterError, CheckpointError
from .fingerprint import base_identity, check_same_base
from .heads import Head, HeadConfig
from .interop import foreign_format, read_foreign, write_foreign
from .records import AdapterRecord
from .setup_lock import lock_of, setup_change
from .sharing import local_folder
from .sharing import push_adapter as publish_adapter

if TYPE_CHECKING:  # pragma: no cover
    from .model import AdapterModel


def save_adapter(model: "AdapterModel", directory: "str | os.PathLike", name: str, *, with_head: bool = True,
                 format: str = "adapterkit") -> None:
    """``AdapterModel.save_adapter``: the adapter ``name`` (and its head) into ``directory``."""
    model._require([name])
    record = model.records[name]
    sites = record.sites
    head = model.heads[name] if with_head and name in model.heads else None
    meta = {
        "name": name,
        "adapterkit_version": __version__,
        "config": record.config.as_saved().to_dict(),
        "places": [s.place_id for s in sites],
        "base_model": {**model.layout.fingerprint(), **base_identity(model, sites),
                       "host_shapes": {s.place_id: s.weight_shape() for s in sites},
                       **({"source": model.base_source} if model.base_source else {})},
        "head": head.config.to_dict() if head is not None else None,
    }
    tensors = {f"adapter.{key}.{k}": v for key, unit in record.modules.items() for k, v in unit.saved_state().items()}
    if head is not None:
        tensors.update({f"head.{k}": v for k, v in head.state_dict().items()})
    if format != "adapterkit":
        write_foreign(directory, format, meta, tensors, model)
        return
    write_checkpoint(directory, meta, tensors)


def read_adapter(model: "AdapterModel", directory: "str | os.PathLike", *, load_as: Optional[str] = None,
                 with_head: bool = True, allow_pickle: bool = False,
                 strict_base: bool = True) -> tuple[AdapterRecord, Optional[Head]]:
    """The adapter saved in ``directory`` (any format) and its head, checked against ``model``
    and loaded, not attached (module docstring)."""
    if foreign_format(directory):
        meta, tensors = read_foreign(directory, model, allow_pickle=allow_pickle)
    else:
        meta, tensors = read_checkpoint(directory)
    name = load_as or meta.get("name")
    model._check_name(name)
    if name in model.adapters:
        raise AdapterError(f"An adapter named '{name}' already exists; pass load_as='other_name' or delete it first.")
    try:
        cfg = config_from_dict(meta["config"])
    except AdapterError as err:
        raise CheckpointError(f"{directory}: {err}") from None
    check_base_shape(meta.get("base_model", {}), model.layout.fingerprint(), directory)
    record = model._build(name, cfg.for_loading())  # the saved weights replace the initialisation
    record.config = cfg
    _check_places(record, meta, directory)
    check_same_base(meta.get("base_model", {}), model, directory, strict=strict_base, sites=record.sites)
    head = None
    if with_head and meta.get("head_skipped"):  # a foreign head without an adapterkit counterpart
        warnings.warn(f"{meta['head_skipped']}.", UserWarning, stacklevel=3)  # at load_adapter's caller
    if with_head and meta.get("head"):
        if name in model.heads:
            raise AdapterError(f"A head named '{name}' already exists; pass load_as='other_name' or delete it first.")
        head = model._make_head(HeadConfig.from_dict(meta["head"]))
    load_exact(record.modules, tensors, "adapter.", directory)
    if head is not None:
        load_exact(head, tensors, "head.", directory)
    return record, head


def _check_places(record: AdapterRecord, meta: dict, directory: "str | os.PathLike") -> None:
    """The adapter resolves to the places it was saved at, on hosts of the saved weight shapes."""
    sites = record.sites
    if [s.place_id for s in sites] != meta.get("places"):
        raise CheckpointError(
            f"{directory}: the adapter occupies places {meta.get('places')[:4]}..., but this model resolves its "
            f"config to {[s.place_id for s in sites][:4]}...; load it into the base model it was trained on."
        )
    saved_shapes = meta.get("base_model", {}).get("host_shapes", {})
    for site in sites:
        if site.place_id in saved_shapes and list(saved_shapes[site.place_id]) != site.weight_shape():
            raise CheckpointError(
                f"{directory}: '{site.place_id}' had weight shape {saved_shapes[site.place_id]} in the base the "
                f"adapter was saved from, but {site.weight_shape()} here; load it into the base it was trained on."
            )


class SavingMethods:
    """``AdapterModel``'s saving, loading and publishing methods (AdapterHub's names); they use
    the handle's ``adapters``, ``heads``, ``_attach``, ``_refresh`` and ``set_active_adapters``."""

    @setup_change
    def save_adapter(self, directory: "str | os.PathLike", name: str, *, with_head: bool = True,
                     format: str = "adapterkit") -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically); ``format="peft"``
        or ``"adapterhub"`` writes that library's folder instead (``adapterkit.interop``)."""
        save_adapter(self, directory, name, with_head=with_head, format=format)

    def push_adapter(self, name: str, location: str, *, overwrite: bool = False, with_head: bool = True,
                     format: str = "adapterkit") -> dict:
        """Publish adapter ``name`` at ``location`` (a folder, ``s3://``, ``hf://``) with a manifest and a
        model card (``adapterkit.sharing.publish``); ``overwrite=True`` replaces a published one."""
        return publish_adapter(self, name, location, overwrite=overwrite, with_head=with_head, format=format)

    def save_all_adapters(self, directory: "str | os.PathLike", *, with_head: bool = True) -> None:
        """Each adapter into ``directory/<name>``."""
        for name in self.adapters:
            self.save_adapter(os.path.join(directory, name), name, with_head=with_head)

    def load_adapter(
        self, directory: "str | os.PathLike", *, load_as: Optional[str] = None, set_active: bool = False,
        with_head: bool = True, allow_pickle: bool = False, strict_base: bool = True, source: Optional[str] = None,
    ) -> str:
        """Load an adapter (and its head) saved by ``save_adapter``, or by PEFT or AdapterHub
        (recognised by their files); returns its name. Checks that the checkpoint fits this base
        model, and (``strict_base``) that it was trained on this very base (``fingerprint.py``);
        on any error the model is left as it was. ``allow_pickle=True`` reads a foreign folder's
        pickled ``*.bin`` weights (``torch.load(weights_only=True)``); they are refused otherwise.
        ``directory`` may also be a location (``file://``, ``s3://``, ``http(s)://``, ``hf://``): it is
        fetched into the verified cache first (``adapterkit.sharing``); AdapterHub's
        ``load_adapter("org/name", source="hf")`` means ``"hf://org/name"``."""
        folder = local_folder(directory, source=source)  # a download holds no lock: forwards go on
        with lock_of(self).writing("call load_adapter()"):
            record, head = read_adapter(self, folder, load_as=load_as, with_head=with_head,
                                               allow_pickle=allow_pickle, strict_base=strict_base)
            name = record.name
            self._attach(record)
            if head is not None:
                self.heads[name] = head
            if set_active:
                self.set_active_adapters(name)
            else:
                self._refresh(compile_only=(name,))
        return name
