"""Where published adapters live: one small reader/writer per kind of location.

A location is a string. ``parse`` turns it into a ``Store`` that can ``read`` a file under it,
``list`` what it holds (where the kind of store can list) and ``write`` a file (where it can be
written):

* ``s3://bucket/prefix`` -- any S3 API (AWS, MinIO, ...) through ``fsspec`` / ``s3fs``, with the
  usual AWS credentials and config; ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` name another
  endpoint;
* ``http(s)://host/path`` -- a static file server, read only (no listing: files are found through
  the manifest);
* ``hf://owner/repo[@revision][/subfolder]`` -- a Hugging Face Hub model repo, through
  ``huggingface_hub`` (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``);
* a local path or ``file://`` URL is not a store: it is used where it is (``locations.py``).

Errors are ``AdapterError`` naming the location and the fix; "not there" is ``None`` from
``read``, so callers can say which file is missing.
"""

from __future__ import annotations

import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import AdapterError

REMOTE_SCHEMES = ("s3", "http", "https", "hf")
TIMEOUT = 60.0


def scheme_of(location: str) -> str:
    head, sep, _ = str(location).partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and scheme_of(location) in REMOTE_SCHEMES


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class Store:
    """A folder-like place holding files; paths are ``/``-separated and relative to it."""

    location: str
    can_list = True
    can_write = True

    def read(self, path: str) -> bytes | None:  # pragma: no cover - interface
        raise NotImplementedError

    def list(self, path: str = "") -> list[tuple[str, bool]]:
        """Direct children of ``path``: (name, is_folder)."""
        raise AdapterError(f"{self.location}: a {scheme_of(self.location)} location cannot be listed; name the adapter "
                           "itself (its folder holds adapterkit_manifest.json).")

    def write(self, path: str, data: bytes) -> None:
        raise AdapterError(f"{self.location}: cannot publish to a {scheme_of(self.location)} location (a static file "
                           "server is read only); push to s3://, hf:// or a folder and serve that.")

    def child(self, name: str) -> str:
        return self.location.rstrip("/") + "/" + name


# -- S3 ------------------------------------------------------------------------------------------
def _s3_filesystem():
    try:
        import s3fs  # noqa: PLC0415 - optional dependency: the sharing extra
    except ImportError:  # pragma: no cover - an extra
        raise AdapterError("s3:// locations need s3fs: pip install 'adapterkit[sharing]'.") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = {"endpoint_url": endpoint} if endpoint else {}
    # s3fs keeps one instance per set of arguments (a client set up once: the first request of a
    # fresh one costs ~0.1 s); no listings cache, so a listing always sees the latest uploads
    return s3fs.S3FileSystem(client_kwargs=client, use_listings_cache=False)


class S3Store(Store):
    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.root = self.location[len("s3://"):]
        if not self.root or self.root.startswith("/"):
            raise AdapterError(f"'{location}' names no bucket; write s3://BUCKET/PREFIX.")
        self.fs = _s3_filesystem()

    def _path(self, path: str) -> str:
        return posixpath.join(self.root, path) if path else self.root

    def _guard(self, err: Exception, what: str) -> AdapterError:
        return AdapterError(f"{self.location}: cannot {what} ({type(err).__name__}: {err}); check the bucket name, the "
                            "endpoint (AWS_ENDPOINT_URL) and the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE).")

    def read(self, path: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise self._guard(err, f"read {path}") from None

    def list(self, path: str = "") -> list[tuple[str, bool]]:
        try:
            entries = self.fs.ls(self._path(path), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            raise self._guard(err, "list") from None
        base = self._path(path).rstrip("/")
        return sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory")
                      for e in entries if e["name"].rstrip("/") != base)

    def write(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._path(path), data)
        except (OSError, ValueError) as err:
            raise self._guard(err, f"write {path}") from None


# -- HTTP ----------------------------------------------------------------------------------------
def http_get(url: str, headers: dict[str, str] | None = None, *, where: str) -> bytes | None:
    """The body at ``url``; ``None`` on 404; any other failure is an ``AdapterError`` naming ``where``."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        hint = " (set HF_TOKEN for a private repo)" if err.code in (401, 403) and where.startswith("hf://") else ""
        raise AdapterError(f"{where}: the server answered {err.code} {err.reason} for {url}{hint}.") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise AdapterError(f"{where}: cannot reach {url} ({reason}); check the address and the network.") from None


class HttpStore(Store):
    can_list = False
    can_write = False

    def __init__(self, location: str):
        self.location = location.rstrip("/")

    def read(self, path: str) -> bytes | None:
        return http_get(self.child(urllib.parse.quote(path)), where=self.location)


# -- Hugging Face Hub ----------------------------------------------------------------------------
@dataclass
class HfName:
    repo: str
    revision: str
    subfolder: str


def parse_hf(location: str) -> HfName:
    rest = location[len("hf://"):].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise AdapterError(f"'{location}' names no repo; write hf://OWNER/REPO[@REVISION][/SUBFOLDER].")
    repo_name, _, revision = parts[1].partition("@")
    return HfName(f"{parts[0]}/{repo_name}", revision or "main", "/".join(parts[2:]))


class HfStore(Store):
    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.name = parse_hf(location)
        if hf_offline():
            raise AdapterError(f"{location}: HF_HUB_OFFLINE is set, and this adapter is not in the cache; pull it once "
                               "while online (adapterkit pull) or unset HF_HUB_OFFLINE.")

    @staticmethod
    def endpoint() -> str:
        from huggingface_hub import constants  # noqa: PLC0415 - optional dependency: the sharing extra

        return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")

    @staticmethod
    def token() -> str | None:
        from huggingface_hub import get_token  # noqa: PLC0415 - optional dependency: the sharing extra

        return os.environ.get("HF_TOKEN") or get_token()

    def _file(self, path: str) -> str:
        return posixpath.join(self.name.subfolder, path) if self.name.subfolder else path

    def read(self, path: str) -> bytes | None:
        from huggingface_hub import hf_hub_url  # noqa: PLC0415 - optional dependency: the sharing extra
        from huggingface_hub.utils import build_hf_headers  # noqa: PLC0415 - optional dependency: the sharing extra

        url = hf_hub_url(self.name.repo, self._file(path), revision=self.name.revision, endpoint=self.endpoint())
        return http_get(url, build_hf_headers(token=self.token()), where=self.location)

    def _api(self):
        from huggingface_hub import HfApi  # noqa: PLC0415 - optional dependency: the sharing extra

        return HfApi(endpoint=self.endpoint(), token=self.token())

    def all_files(self) -> list[str]:
        try:
            return self._api().list_repo_files(self.name.repo, revision=self.name.revision)
        except Exception as err:  # noqa: BLE001 - huggingface_hub raises its own HTTP error types
            raise AdapterError(f"{self.location}: cannot list the repo ({type(err).__name__}: {err}); check the name, "
                               "the revision, HF_ENDPOINT and HF_TOKEN.") from None

    def list(self, path: str = "") -> list[tuple[str, bool]]:
        prefix = self._file(path).strip("/")
        prefix = prefix + "/" if prefix else ""
        out: dict[str, bool] = {}
        for name in self.all_files():
            if name.startswith(prefix):
                head, sep, _ = name[len(prefix):].partition("/")
                out[head] = out.get(head, False) or bool(sep)
        return sorted(out.items())

    def child(self, name: str) -> str:
        return f"hf://{self.name.repo}@{self.name.revision}/{self._file(name)}"

    def commit(self, files: dict[str, bytes], message: str) -> None:
        """All files in one Hub commit (a reader sees the old adapter or the new one, never a mix)."""
        from huggingface_hub import CommitOperationAdd  # noqa: PLC0415 - optional dependency: the sharing extra

        api = self._api()
        ops = [CommitOperationAdd(path_in_repo=self._file(n), path_or_fileobj=data) for n, data in files.items()]
        try:
            api.create_repo(self.name.repo, exist_ok=True)
            api.create_commit(self.name.repo, operations=ops, commit_message=message, revision=self.name.revision)
        except Exception as err:  # noqa: BLE001 - the Hub client raises many types
            raise AdapterError(f"{self.location}: the Hub refused the upload ({type(err).__name__}: {err}); check "
                               "HF_TOKEN (it needs write access) and the repo name.") from None


def open_store(location: str) -> Store:
    scheme = scheme_of(location)
    if scheme == "s3":
        return S3Store(location)
    if scheme in ("http", "https"):
        return HttpStore(location)
    if scheme == "hf":
        return HfStore(location)
    raise AdapterError(f"'{location}' is not a remote location; use s3://, http(s)://, hf:// or a folder path.")
