"""``adapterkit convert SRC DST --to adapterkit|peft|adapterhub``: one adapter folder into another
format, through the one checked path: the base model is loaded, the adapter is loaded into it
(``load_adapter``: every check of a normal load), and saved in the target format
(``save_adapter(..., format=...)``), safetensors only. What the target cannot express is refused
before anything is written; the source is never modified. ``--without-head`` converts the
adapter alone and names the head it left behind; ``heads_left_behind`` tells ``adapterkit train``
up front which formats will not take its head.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import AdapterError
from .interop import FORMATS
from .loader import load_base_model
from .model import AdapterModel
from .sharing import is_remote
from .train.artifacts import base_model_of, locate

#: the library's advice, in the command's words
_CLI_WORDS = {r"[Ss]ave with with_head=False": "pass --without-head to convert the adapter alone",
              r"with_head=False": "--without-head", r"format='adapterkit'": "--to adapterkit"}


def convert(src: "str | Path", dst: "str | Path", to: str, *, model: Optional[str] = None,
            allow_pickle: bool = False, with_head: bool = True) -> str:
    """Convert the adapter in ``src`` (any format) to ``to`` in ``dst``; returns a summary line.
    ``model`` is the base model (a folder or alias), by default the one recorded beside ``src``;
    ``with_head=False`` (``--without-head``) converts the adapter alone, saying what stays behind."""
    if to not in FORMATS:
        raise AdapterError(f"--to {to!r}: choose one of {', '.join(FORMATS)}.")
    dst = Path(dst)
    src = src if is_remote(src) else Path(src)  # a location (s3://, hf://, ...) is fetched by locate
    if isinstance(src, Path) and (dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents):
        raise AdapterError(f"{dst}: converting into the source folder would replace it; choose another folder.")
    artifact = locate(src)
    if artifact.kind != "adapter":
        raise AdapterError(f"{src}: is a full model, not an adapter; there is nothing to convert.")
    base = base_model_of(artifact, model)
    net = AdapterModel(load_base_model(base))
    name = net.load_adapter(artifact.path, allow_pickle=allow_pickle)
    try:
        net.save_adapter(dst, name, format=to, with_head=with_head)
    except AdapterError as err:
        message = str(err)
        for pattern, words in _CLI_WORDS.items():
            message = re.sub(pattern, words, message)
        raise AdapterError(message) from None
    method = net.adapter_summary(as_dict=True)[0]["method"]
    line = f"converted {method} adapter '{name}'{' with its head' if with_head and name in net.heads else ''} from " \
           f"{artifact.path} to {to} format in {dst}"
    if not with_head and name in net.heads:
        line += (f"\nleft behind: its {_describe_head(net.heads[name])}, which stays in {artifact.path} (adapterkit "
                 f"eval / predict --adapter {src} use it); the {to} folder holds the adapter alone")
    return line


def _describe_head(head: Any) -> str:
    cfg = head.config
    labels = f", {cfg.num_labels} outputs" if cfg.type != "regression" else ""
    return f"{cfg.type} head ({cfg.layers} layer(s), pooling {cfg.pooling}{labels})"


def heads_left_behind(model: Any, name: str) -> list[str]:
    """The formats (``peft``, ``adapterhub``) that take adapter ``name`` but not its head, found by
    writing both into a temporary folder (removed); ``adapterkit train`` names them at the start."""
    if name not in model.heads:
        return []
    found = []
    scratch = Path(tempfile.mkdtemp(prefix="adapterkit-head-check-"))
    try:
        for fmt in (f for f in FORMATS if f != "adapterkit"):
            try:
                if _head_refused(model, name, fmt, scratch):
                    found.append(fmt)
            except Exception:  # noqa: BLE001 - an advisory note must never stop a run; convert reports it
                continue
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return found


def _head_refused(model: Any, name: str, fmt: str, scratch: Path) -> bool:
    """``fmt`` refuses the adapter with its head but takes it without (the head is the reason)."""
    try:
        model.save_adapter(scratch / f"{fmt}-head", name, format=fmt)
        return False
    except AdapterError:
        pass
    try:
        model.save_adapter(scratch / fmt, name, format=fmt, with_head=False)
    except AdapterError:
        return False  # the adapter itself has no counterpart there: not the head's doing
    return True
