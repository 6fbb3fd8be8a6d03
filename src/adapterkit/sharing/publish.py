"""Publishing adapters (``adapterkit push``, ``AdapterModel.push_adapter``) and listing them (``ls``).

``push`` stages the adapter's files with a model card (``card.py``) and a manifest of their
SHA-256s (``manifest.py``), then makes them visible in one step, so a reader sees the previous
adapter or the new one, never a mix:

* a folder (path or ``file://``): the staged folder is renamed into place (the previous one is
  renamed aside first and removed once the new one is in);
* ``s3://``: every file is uploaded under ``.adapterkit/blobs/<sha256>`` (a name that never changes
  content), the manifest -- one object, replaced atomically by S3 -- is written last and is what
  readers follow; the previous version's blobs stay (nothing is deleted) and ``README.md`` is
  also written at the top for people browsing the bucket;
* ``hf://``: all files in one Hub commit.

Publishing over an existing adapter needs ``overwrite=True``; a destination holding anything
else is refused, never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import AdapterError, CheckpointError
from ..interop import detect_format
from . import card
from .locations import local_path
from .manifest import MANIFEST_NAME, Manifest, build_manifest, read_local_manifest
from .stores import HfStore, S3Store, Store, is_remote, open_store

CARD_NAME = "README.md"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe_adapter(folder: Path) -> dict[str, Any]:
    """name, format, method and base of an adapter folder of any format (from its JSON files)."""
    fmt = detect_format(folder)
    config = _read_json(folder / "adapter_config.json") or {}
    recorded = _read_json(folder / "adapterkit_base.json") or {}
    if fmt == "adapterkit":
        saved = config.get("base_model") or {}
        base = {"model": recorded.get("model") or saved.get("name"), "fingerprint": saved.get("fingerprint"),
                "model_type": saved.get("model_type")}
        return {"name": config.get("name"), "format": fmt, "method": (config.get("config") or {}).get("method"),
                "base": base}
    if fmt == "peft":
        return {"name": folder.name, "format": fmt, "method": str(config.get("peft_type", "")).lower(),
                "base": {"model": config.get("base_model_name_or_path")}}
    inner = config.get("config") or {}
    return {"name": config.get("name") or folder.name, "format": fmt,
            "method": inner.get("architecture") or ("lora" if "r" in inner else "bottleneck"),
            "base": {"model": config.get("model_name"), "model_type": config.get("model_type")}}


def _adapter_and_run(source: Path) -> tuple[Path, Path | None]:
    """The adapter folder to publish and the run folder it came from (for the card), if any."""
    if not source.is_dir():
        raise AdapterError(f"{source}: no such folder; pass an adapter folder or a run folder (--out of adapterkit train).")
    if (source / "run.json").is_file() and (source / "adapter" / "adapter_config.json").is_file():
        return source / "adapter", source
    if not (source / "adapter_config.json").is_file():
        raise AdapterError(f"{source}: not an adapter folder (adapter_config.json is missing) nor a run folder with an "
                           "adapter/; pass the folder save_adapter or adapterkit train wrote.")
    run = source.parent if (source.parent / "run.json").is_file() else None
    return source, run


def stage(source: Path, location: str, into: Path) -> Manifest:
    """Copy the adapter's files into ``into`` with a model card; returns their manifest."""
    adapter, run = _adapter_and_run(source)
    for path in sorted(adapter.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in (MANIFEST_NAME, CARD_NAME):
            shutil.copy2(path, into / path.name)
    info = describe_adapter(adapter)
    info["size"] = sum(p.stat().st_size for p in into.iterdir() if p.is_file())
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_info = _read_json(run / "run.json") if run else None
    results = _read_json(run / "results.json") if run else None
    (into / CARD_NAME).write_text(card.render(info, location, run_info, results), encoding="utf-8")
    return build_manifest(into, info)


def push(source: str | os.PathLike, location: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Publish the adapter (or run) folder ``source`` at ``location``; returns the manifest's info."""
    source = local_path(source)
    _adapter_and_run(source)  # a bad source is refused before anything is written
    if not is_remote(location):
        return _push_local(source, local_path(location), location, overwrite)
    store = open_store(location)
    with tempfile.TemporaryDirectory(prefix="adapterkit-push-") as tmp:
        manifest = stage(source, location, Path(tmp))
        if isinstance(store, HfStore):
            _check_remote_target(store, overwrite, listing=False)
            files = {n: (Path(tmp) / n).read_bytes() for n in manifest.files}
            files[MANIFEST_NAME] = manifest.to_json()
            store.commit(files, f"adapterkit push {manifest.info.get('name') or ''}".strip())
        elif isinstance(store, S3Store):
            _check_remote_target(store, overwrite, listing=True)
            manifest.info["layout"] = "blobs"
            for name, entry in sorted(manifest.files.items()):
                store.write(f".adapterkit/blobs/{entry['sha256']}", (Path(tmp) / name).read_bytes())
            store.write(CARD_NAME, (Path(tmp) / CARD_NAME).read_bytes())
            store.write(MANIFEST_NAME, manifest.to_json())  # the switch: readers follow the manifest
        else:
            store.write(MANIFEST_NAME, b"")  # raises: read-only store
    return {**manifest.info, "location": location, "files": len(manifest.files), "size": manifest.size}


def _check_remote_target(store: Store, overwrite: bool, *, listing: bool) -> None:
    if store.read(MANIFEST_NAME) is not None:
        if not overwrite:
            raise AdapterError(f"{store.location} holds a published adapter already; pass --overwrite "
                               "(overwrite=True) to replace it, or choose another location.")
        return
    if listing and any(not name.startswith(".") for name, _ in store.list()):
        raise AdapterError(f"{store.location} holds other files and no adapterkit manifest; publishing there would mix "
                           "them with the adapter: choose an empty prefix.")


def _push_local(source: Path, target: Path, location: str, overwrite: bool) -> dict[str, Any]:
    if target.exists():
        if not target.is_dir():
            raise AdapterError(f"{location} is a file; pass a folder path to publish into.")
        if any(target.iterdir()):
            if read_local_manifest(target) is None:
                raise AdapterError(f"{location} holds other files and no adapterkit manifest; publishing there would "
                                   "delete them: choose a new or empty folder.")
            if not overwrite:
                raise AdapterError(f"{location} holds a published adapter already; pass --overwrite to replace it.")
    if source.resolve() == target.resolve():
        raise AdapterError(f"{location} is the adapter folder itself; publish into another folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.push-", dir=target.parent))
    try:
        manifest = stage(source, location, tmp)
        (tmp / MANIFEST_NAME).write_bytes(manifest.to_json())
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest.info, "location": location, "files": len(manifest.files), "size": manifest.size}


def push_adapter(model: Any, name: str, location: str, *, overwrite: bool = False, with_head: bool = True,
                 format: str = "adapterkit") -> dict[str, Any]:
    """``AdapterModel.push_adapter``: save adapter ``name`` and publish it at ``location``."""
    with tempfile.TemporaryDirectory(prefix="adapterkit-save-") as tmp:
        folder = Path(tmp) / name
        model.save_adapter(folder, name, with_head=with_head, format=format)
        return push(folder, location, overwrite=overwrite)


# -- adapterkit ls ---------------------------------------------------------------------------------
def _row(location: str, manifest: Manifest) -> dict[str, Any]:
    info = manifest.info
    base = info.get("base") or {}
    return {"location": location, "name": info.get("name"), "base": base.get("model") or base.get("name"),
            "method": info.get("method"), "format": info.get("format"), "size": manifest.size,
            "created": info.get("created")}


def ls(location: str) -> list[dict[str, Any]]:
    """The published adapters at ``location`` or one level under it (every level on the Hub)."""
    if not is_remote(location):
        root = local_path(location)
        if not root.is_dir():
            raise AdapterError(f"{location}: no such folder; pass a folder of published adapters or a location "
                               "(s3://BUCKET/PREFIX, hf://OWNER/REPO).")
        folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        rows = []
        for folder in folders:
            manifest = read_local_manifest(folder)
            if manifest is not None:
                rows.append(_row(str(folder) if folder != root else location, manifest))
        return rows
    store = open_store(location)
    raw = store.read(MANIFEST_NAME)
    if raw is not None:
        return [_row(location, Manifest.from_json(raw, location))]
    if isinstance(store, HfStore):
        prefix = store._file("").strip("/")
        names = [n[: -len(MANIFEST_NAME) - 1] for n in store.all_files()
                 if n.endswith("/" + MANIFEST_NAME) and n.startswith(prefix)]
        children = [n[len(prefix):].strip("/") for n in names]
    else:
        children = [name for name, is_dir in store.list() if is_dir and not name.startswith(".")]
    rows = []
    for child in children:
        sub = open_store(store.child(child))
        raw = sub.read(MANIFEST_NAME)
        if raw is not None:
            try:
                rows.append(_row(sub.location, Manifest.from_json(raw, sub.location)))
            except CheckpointError:
                continue
    return rows
