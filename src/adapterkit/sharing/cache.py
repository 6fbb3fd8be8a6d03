"""The local cache of adapters fetched from remote locations: content-addressed and verified.

Layout under ``cache_root()`` (``$ADAPTERKIT_CACHE``, default ``~/.cache/adapterkit``)::

    adapters/<key>/<leaf>/  one complete adapter: its files + adapterkit_manifest.json; <key> is
                        the manifest's content address (a hash of its files' SHA-256s), <leaf> the
                        last part of the location (PEFT and AdapterHub folders are named by it)
    refs/<id>.json      which location was last fetched into which key, and when
    tmp/<pid>-<rand>/   downloads under way

A download fills its own ``tmp`` folder, checks every file against the manifest, and only then
renames the folder to ``adapters/<key>`` -- one atomic rename (or its ``<leaf>`` into an
existing ``adapters/<key>``). So a process killed mid-way leaves
only a ``tmp`` folder, which no load ever looks at (``prune`` removes those whose process is
gone); two processes pulling the same adapter both download, the first rename wins and the
second finds the same, verified content in place. A cached folder is checked against its
manifest again each time it is used, so a file changed in the cache is noticed too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterError, CheckpointError
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    build_manifest,
    check_file_name,
    sha256_bytes,
)
from .stores import Store

#: the files of an adapterkit, PEFT or AdapterHub folder, tried by name where a store cannot list
KNOWN_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapterkit_base.json",
               "adapterkit_task.json", "adapter.safetensors", "pytorch_adapter.bin", "head_config.json",
               "model_head.safetensors", "pytorch_model_head.bin", "README.md", "results.json")


def cache_root() -> Path:
    env = os.environ.get("ADAPTERKIT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adapterkit"


class AdapterNotFound(AdapterError):
    """Nothing is published at a location (the server then tries its next source, or answers 404)."""


@dataclass
class Fetched:
    folder: Path
    key: str
    hit: bool  # True: the content was in the cache already, nothing was downloaded


def _ref_path(root: Path, location: str) -> Path:
    return root / "refs" / f"{sha256_bytes(location.encode())[:32]}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def leaf_name(location: str) -> str:
    """The folder name a location's adapter gets in the cache: its last part, e.g. ``sst2``."""
    last = location.rstrip("/").rsplit("/", 1)[-1].split("@")[0]
    clean = "".join(c if c.isalnum() or c in "-_" else "_" for c in last)
    return clean or "adapter"


def _record(root: Path, location: str, key: str) -> None:
    body = {"location": location, "key": key, "leaf": leaf_name(location), "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomic(_ref_path(root, location), json.dumps(body).encode())


def lookup(location: str, root: Path | None = None) -> Path | None:
    """The verified cached folder last fetched from ``location``, or ``None`` (used offline)."""
    root = root or cache_root()
    ref = _ref_path(root, location)
    try:
        body = json.loads(ref.read_text(encoding="utf-8"))
        folder = root / "adapters" / body["key"] / body["leaf"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if _verified(folder, location) else None


def _verified(folder: Path, source: str) -> bool:
    if not (folder / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), source)
        manifest.check_folder(folder, source)
    except (CheckpointError, OSError):
        return False
    return manifest.key == folder.parent.name  # the content address matches the content


def _remote_path(manifest: Manifest, name: str) -> str:
    """Where a manifest's file lives under its location (``blobs`` layout: by its hash)."""
    if manifest.info.get("layout") == "blobs":
        return f".adapterkit/blobs/{manifest.files[name]['sha256']}"
    return name


def _unlisted_manifest(store: Store, tmp: Path, required: str) -> Manifest:
    """A folder published without a manifest (a plain PEFT / AdapterHub folder, a model folder):
    take its files as they are (the top level only) and hash them here, so the cache copy is
    checked from now on. ``required``: the file that says it is what the caller wants."""
    names = [n for n, is_dir in store.list() if not is_dir] if store.can_list else list(KNOWN_FILES)
    if required not in names:
        names.append(required)
    for name in names:
        if name.startswith("."):
            continue
        data = store.read(name)
        if data is not None:
            (tmp / name).write_bytes(data)
    if not (tmp / required).is_file():
        what = "adapter" if required == "adapter_config.json" else "model"
        raise AdapterNotFound(f"{store.location}: no {what} there (neither {MANIFEST_NAME} nor {required}); check the "
                              "location, or list what it holds with adapterkit ls.")
    return build_manifest(tmp, {"verified": False})


def fetch(store: Store, root: Path | None = None, *, required: str = "adapter_config.json") -> Fetched:
    """The adapter (or, ``required="config.json"``, the model) at ``store`` as a verified local
    folder, downloading it unless it is cached."""
    root = root or cache_root()
    location = store.location
    raw = store.read(MANIFEST_NAME)
    manifest = Manifest.from_json(raw, location) if raw is not None else None
    leaf = leaf_name(location)
    if manifest is not None:
        folder = root / "adapters" / manifest.key / leaf
        if _verified(folder, location):
            _record(root, location, manifest.key)
            return Fetched(folder, manifest.key, True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    outer = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root / "tmp"))
    tmp = outer / leaf
    tmp.mkdir()
    try:
        if manifest is None:
            manifest = _unlisted_manifest(store, tmp, required)
        else:
            for name in sorted(manifest.files):
                check_file_name(name, location)
                data = store.read(_remote_path(manifest, name))
                if data is None:
                    raise CheckpointError(f"{location}: file '{name}' named in the manifest is missing at the source; "
                                          "the upload is incomplete: publish the adapter again.")
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                manifest.check_file(name, target, location)
        (tmp / MANIFEST_NAME).write_bytes(manifest.to_json())
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.chmod(outer, 0o755)
        folder = root / "adapters" / manifest.key / leaf
        try:
            os.rename(outer, folder.parent)  # atomic; fails if that content is there already
        except OSError:
            try:
                os.rename(tmp, folder)  # the same content under another name, or a damaged copy
            except OSError:
                if not _verified(folder, location):  # another process was first: its copy must be good
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(tmp, folder)
        _record(root, location, manifest.key)
        return Fetched(folder, manifest.key, False)
    finally:
        shutil.rmtree(outer, ignore_errors=True)


# -- adapterkit cache ls / rm / prune -----------------------------------------------------------
def entries(root: Path | None = None) -> list[dict[str, Any]]:
    """One row per cached adapter: key, size, the locations it was fetched from, when."""
    root = root or cache_root()
    refs: dict[str, list[dict[str, Any]]] = {}
    for ref in sorted((root / "refs").glob("*.json")) if (root / "refs").is_dir() else []:
        try:
            body = json.loads(ref.read_text(encoding="utf-8"))
            refs.setdefault(body["key"], []).append(body)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    rows = []
    for folder in sorted((root / "adapters").iterdir()) if (root / "adapters").is_dir() else []:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        seen = refs.get(folder.name, [])
        rows.append({"key": folder.name, "size": size, "locations": [r["location"] for r in seen],
                     "fetched": max((r["fetched"] for r in seen), default=None), "path": str(folder)})
    return rows


def remove(what: str, root: Path | None = None) -> list[str]:
    """Remove the cached adapter with key (or key prefix) ``what``, or fetched from location ``what``."""
    root = root or cache_root()
    rows = entries(root)
    chosen = [r for r in rows if what in r["locations"] or (len(what) >= 6 and r["key"].startswith(what))]
    if not chosen:
        raise AdapterError(f"'{what}' is neither a cached adapter's key nor a location in the cache; see "
                           "adapterkit cache ls.")
    for row in chosen:
        _drop(root, row)
    return [r["key"] for r in chosen]


def _drop(root: Path, row: dict[str, Any]) -> None:
    for location in row["locations"]:
        _ref_path(root, location).unlink(missing_ok=True)
    shutil.rmtree(row["path"], ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune(root: Path | None = None, *, older_than_days: float | None = None) -> dict[str, int]:
    """Remove downloads left by dead processes, cached adapters whose files no longer match their
    manifest, stale refs, and (``older_than_days``) adapters not fetched for that long."""
    root = root or cache_root()
    removed = {"partial": 0, "damaged": 0, "old": 0}
    for tmp in sorted((root / "tmp").iterdir()) if (root / "tmp").is_dir() else []:
        pid = tmp.name.split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed["partial"] += 1
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    for row in entries(root):
        folder = Path(row["path"])
        leaves = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        if not leaves or not all(_verified(leaf, row["key"]) for leaf in leaves):
            _drop(root, row)
            removed["damaged"] += 1
        elif cutoff is not None and (row["fetched"] is None or
                                     time.mktime(time.strptime(row["fetched"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
                                     < cutoff):
            _drop(root, row)
            removed["old"] += 1
    for ref in (root / "refs").glob("*.json") if (root / "refs").is_dir() else []:
        try:
            key = json.loads(ref.read_text(encoding="utf-8"))["key"]
        except (OSError, ValueError, KeyError, TypeError):
            key = None
        if key is None or not (root / "adapters" / key).is_dir():
            ref.unlink(missing_ok=True)
    return removed
