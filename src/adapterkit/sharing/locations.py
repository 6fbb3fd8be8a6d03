"""Adapter locations: turn what a user typed into a local, verified adapter folder.

``local_folder(location)`` is the one call every place that accepts an adapter folder makes
(``AdapterModel.load_adapter``, the CLI's ``--adapter``, ``serve --adapter`` and the load
endpoint). A local path or ``file://`` URL comes back as the path (a folder holding a manifest is
checked against it); ``s3://``, ``http(s)://`` and ``hf://`` locations are fetched into the cache
(``cache.py``) and the cached folder comes back. With ``HF_HUB_OFFLINE`` set, an ``hf://`` location
is answered from the cache alone.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from ..errors import AdapterError, CheckpointError
from .cache import Fetched, cache_root, fetch, lookup
from .manifest import read_local_manifest
from .stores import hf_offline, is_remote, open_store, scheme_of

#: what AdapterHub's hub names looked like: "org/name" or "task/subtask@org"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")


def local_path(location: str | os.PathLike) -> Path:
    """A local path or ``file://`` URL as a ``Path`` (no check that it exists)."""
    text = os.fspath(location)
    if scheme_of(text) == "file":
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    return Path(text).expanduser() if text.startswith("~") else Path(text)


def pull(location: str, root: Path | None = None, *, required: str = "adapter_config.json") -> Fetched:
    """Fetch a remote ``location`` into the cache (or find it there); see ``cache.fetch``."""
    if scheme_of(location) == "hf" and hf_offline():
        found = lookup(location, root)
        if found is not None:
            return Fetched(found, found.parent.name, True)
    return fetch(open_store(location), root or cache_root(), required=required)


def local_model(location: str) -> str:
    """A base model given as a location (``serve --model s3://...``, each Ray replica) fetched into
    the cache: its local folder; anything else (a folder, an alias) is returned as it is."""
    if not is_remote(location):
        return str(local_path(location)) if scheme_of(location) == "file" else location
    return str(pull(location, required="config.json").folder)


def hub_form(location: str | os.PathLike, source: str | None) -> str | os.PathLike:
    """AdapterHub's ``load_adapter("org/name", source="hf")`` as ``hf://org/name``; refuses the
    sources that no longer exist, and says what a bare ``org/name`` that is no folder could mean."""
    text = os.fspath(location)
    if source is None:
        if not scheme_of(text) and _HUB_NAME.match(text) and not Path(text).exists():
            raise CheckpointError(f"No adapter folder '{text}'. If it names a Hugging Face Hub repo, load "
                                  f"'hf://{text.split('@')[0]}' (or pass source='hf'); AdapterHub's own hub names "
                                  "('nli/multinli@ukp') are retired: its adapters are on the Hub as AdapterHub/NAME.")
        return location
    if source == "hf":
        return text if scheme_of(text) else f"hf://{text}"
    if source in ("local", "file"):
        return location
    raise AdapterError(f"source={source!r} is not supported: AdapterHub's hub ('ah') is retired and its adapters are on "
                       "the Hugging Face Hub; pass source='hf' with 'AdapterHub/NAME', or a location (s3://, hf://, ...).")


def local_folder(location: str | os.PathLike, source: str | None = None) -> str | os.PathLike | Path:
    """What to read an adapter from: the path itself for local input (unchanged, so error messages
    name what the user typed), or the verified cache folder of a remote location. ``source``:
    AdapterHub's argument (``"hf"``: ``location`` is a Hub repo)."""
    location = hub_form(location, source)
    if is_remote(location):
        return pull(str(location)).folder
    path = local_path(location)
    if path.is_dir():
        manifest = read_local_manifest(path)
        if manifest is not None:
            manifest.check_folder(path, str(location))
    return path if scheme_of(os.fspath(location)) == "file" else location
