"""The manifest of a published adapter: every file's SHA-256 and size, written at publish time.

``adapterkit_manifest.json`` sits beside the adapter's files. A reader fetches it first, then
every file it names, and accepts a file only if its SHA-256 matches; so a file changed at the
source (or damaged on the way) is refused by name, and a cache folder is trusted only while its
files still match. Besides the hashes it records what ``adapterkit ls`` shows without downloading
the weights: the adapter's name, base model, method, size and publication date.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

MANIFEST_NAME = "adapterkit_manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    """``files``: name -> {"sha256", "size"}; ``info``: name, base, method, size, created, layout."""

    files: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The content address: a hash of the (name, sha256) pairs, the same wherever it is published."""
        canon = json.dumps({n: f["sha256"] for n, f in sorted(self.files.items())}, sort_keys=True)
        return sha256_bytes(canon.encode())[:32]

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_json(self) -> bytes:
        body = {"manifest_version": MANIFEST_VERSION, **self.info, "files": self.files}
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{source}: {MANIFEST_NAME} is not valid JSON ({err}); publish the adapter again.") from None
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(f, dict) and isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int)
                for f in files.values()):
            raise CheckpointError(f"{source}: {MANIFEST_NAME} has no valid 'files' table (name -> sha256, size); "
                                  "publish the adapter again with adapterkit push.")
        if body.get("manifest_version", 0) > MANIFEST_VERSION:
            raise CheckpointError(f"{source}: {MANIFEST_NAME} has version {body['manifest_version']}, newer than this "
                                  "adapterkit understands; upgrade adapterkit.")
        for name in files:
            check_file_name(name, source)
        info = {k: v for k, v in body.items() if k not in ("files", "manifest_version")}
        return cls(files, info)

    def check_file(self, name: str, path: Path, source: str) -> None:
        """Refuse ``path`` (the local copy of ``name``) unless its SHA-256 is the manifest's."""
        want = self.files[name]["sha256"]
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(
                f"{source}: file '{name}' has SHA-256 {got[:16]}..., but the manifest says {want[:16]}...: the copy was "
                "changed or damaged after it was published; it was not loaded. Publish the adapter again "
                "(adapterkit push --overwrite) or fetch it from another source.")

    def check_folder(self, folder: Path, source: str) -> None:
        """Every file of the manifest present in ``folder`` with its hash (nothing else is trusted)."""
        for name in sorted(self.files):
            if not (folder / name).is_file():
                raise CheckpointError(f"{source}: file '{name}' named in the manifest is missing; the copy is "
                                      "incomplete: pull it again.")
            self.check_file(name, folder / name, source)


def check_file_name(name: str, source: str) -> None:
    """File names in a manifest are plain names or sub-paths, never absolute or leaving the folder."""
    parts = Path(name).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or any(p.startswith(".") for p in parts):
        raise CheckpointError(f"{source}: the manifest names a file '{name}' outside the adapter folder; refused. "
                              "Publish the adapter again with adapterkit push.")


def build_manifest(folder: Path, info: dict[str, Any] | None = None) -> Manifest:
    """Hash every file under ``folder`` (hidden files and the manifest itself left out)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel == MANIFEST_NAME or any(p.startswith(".") for p in Path(rel).parts):
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return Manifest(files, dict(info or {}))


def read_local_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    return Manifest.from_json(path.read_bytes(), str(folder))
