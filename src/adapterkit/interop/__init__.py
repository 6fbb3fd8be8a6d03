"""Adapters of other libraries: detect a folder's format, read it into adapterkit's in-memory
checkpoint, and write adapterkit's checkpoint in another library's format.

Formats are told apart by ``adapter_config.json`` alone:

* adapterkit: a ``places`` list (``io.read_checkpoint``);
* PEFT: a ``peft_type`` (``interop.peft``);
* AdapterHub ``adapters``: ``config``, ``model_type`` and ``hidden_size`` (``interop.adapterhub``).

A reader turns a foreign folder into the ``(meta, tensors)`` pair ``io.read_checkpoint`` returns,
so ``AdapterModel.load_adapter`` checks and loads every format through one path; a writer turns
that pair into the foreign folder (safetensors). What the target cannot express is refused
before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AdapterError, CheckpointError
from . import adapterhub, peft
from .files import read_json

CONFIG_NAME = "adapter_config.json"
FORMATS = ("adapterkit", "peft", "adapterhub")
_READERS: dict[str, Callable[..., tuple[dict, dict]]] = {"peft": peft.read, "adapterhub": adapterhub.read}
_WRITERS: dict[str, Callable[..., Path]] = {"peft": peft.write, "adapterhub": adapterhub.write}
#: (format, keys its adapter_config.json must have), tried in order
_SIGNATURES = (("adapterkit", ("places",)), ("peft", ("peft_type",)),
               ("adapterhub", ("config", "model_type", "hidden_size")))


def detect_format(directory: "str | Path") -> str:
    """``"adapterkit"``, ``"peft"`` or ``"adapterhub"``, from the folder's ``adapter_config.json``."""
    config_file = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"No adapter checkpoint at '{directory}': the folder does not exist. Check the path.")
    data = read_json(config_file)
    for name, keys in _SIGNATURES:
        if all(k in data for k in keys):
            return name
    raise CheckpointError(f"'{config_file}' is neither an adapterkit adapter ('places'), a PEFT adapter ('peft_type') "
                          "nor an AdapterHub adapter ('config', 'model_type', 'hidden_size').")


def foreign_format(directory: "str | Path") -> "str | None":
    """``"peft"`` or ``"adapterhub"`` when ``directory`` is recognisably one, else ``None`` (then
    ``io.read_checkpoint`` reads it, or says what is wrong with it)."""
    try:
        fmt = detect_format(directory)
    except CheckpointError:
        return None
    return fmt if fmt in _READERS else None


def read_foreign(directory: "str | Path", model: Any, *, allow_pickle: bool = False
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT or AdapterHub folder as adapterkit's ``(meta, tensors)``, for ``model`` (an ``AdapterModel``)."""
    fmt = detect_format(directory)
    if fmt not in _READERS:
        raise CheckpointError(f"'{directory}' is an adapterkit checkpoint; read it with io.read_checkpoint.")
    return _READERS[fmt](Path(directory), model, allow_pickle=allow_pickle)


def write_foreign(directory: "str | Path", fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                  model: Any) -> Path:
    """Write adapterkit's ``(meta, tensors)`` as a ``"peft"`` or ``"adapterhub"`` folder."""
    if fmt not in _WRITERS:
        raise AdapterError(f"Unknown adapter format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return _WRITERS[fmt](directory, meta, tensors, model)


__all__ = ["FORMATS", "detect_format", "foreign_format", "read_foreign", "write_foreign"]
