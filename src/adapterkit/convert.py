"""``adapterkit convert SRC DST --to adapterkit|peft|adapterhub``: one adapter folder into another
format, through the one checked path: the base model is loaded, the adapter is loaded into it
(``load_adapter``: every check of a normal load), and saved in the target format
(``save_adapter(..., format=...)``), safetensors only. What the target cannot express is refused
before anything is written; the source is never modified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import AdapterError
from .interop import FORMATS
from .loader import load_base_model
from .model import AdapterModel
from .train.artifacts import base_model_of, locate


def convert(src: "str | Path", dst: "str | Path", to: str, *, model: Optional[str] = None,
            allow_pickle: bool = False) -> str:
    """Convert the adapter in ``src`` (any format) to ``to`` in ``dst``; returns a summary line.
    ``model`` is the base model (a folder or alias), by default the one recorded beside ``src``."""
    if to not in FORMATS:
        raise AdapterError(f"--to {to!r}: choose one of {', '.join(FORMATS)}.")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise AdapterError(f"{dst}: converting into the source folder would replace it; choose another folder.")
    artifact = locate(src)
    if artifact.kind != "adapter":
        raise AdapterError(f"{src}: is a full model, not an adapter; there is nothing to convert.")
    base = base_model_of(artifact, model)
    net = AdapterModel(load_base_model(base))
    name = net.load_adapter(artifact.path, allow_pickle=allow_pickle)
    net.save_adapter(dst, name, format=to)
    method = net.adapter_summary(as_dict=True)[0]["method"]
    head = " with its head" if name in net.heads else ""
    return f"converted {method} adapter '{name}'{head} from {artifact.path} to {to} format in {dst}"
