"""Real servers on 127.0.0.1 for the sharing tests: an S3 API (moto's server), a static file
server, and a small Hugging Face Hub endpoint (``resolve/<revision>/<path>`` and the tree API)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_SESSION_TOKEN": "testing"}


@contextlib.contextmanager
def s3_server(bucket: str = "adapters") -> Iterator[str]:
    """moto's S3 API on 127.0.0.1; yields its endpoint with ``bucket`` created; sets the AWS env."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        import urllib.request

        import boto3

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


class _Quiet(SimpleHTTPRequestHandler):
    delay = 0.0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.delay:
            time.sleep(self.delay)
        super().do_GET()


@contextlib.contextmanager
def serve_http(handler) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def static_server(root: Path, delay: float = 0.0) -> Iterator[str]:
    """A plain static file server of ``root`` (``delay`` seconds before each answer)."""
    handler = type("Static", (_Quiet,), {"delay": delay})
    with serve_http(partial(handler, directory=str(root))) as url:
        yield url


class HubHandler(SimpleHTTPRequestHandler):
    """``root/OWNER/REPO/<files>`` as the Hub serves them: ``/OWNER/REPO/resolve/REV/PATH`` and
    ``/api/models/OWNER/REPO/tree/REV``. Requests' Authorization headers are kept in ``seen``."""

    root: Path
    seen: list

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        self.seen.append((url.path, self.headers.get("Authorization")))
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo = self.root / parts[2] / parts[3]
            if not repo.is_dir():
                return self._send(404, b'{"error": "Repository not found"}')
            sub = repo.joinpath(*parts[6:]) if len(parts) > 6 else repo
            files = [p for p in sorted(sub.rglob("*")) if p.is_file()]
            body = [{"type": "file", "path": p.relative_to(repo).as_posix(), "size": p.stat().st_size, "oid": "0" * 40}
                    for p in files]
            return self._send(200, json.dumps(body).encode(), "application/json")
        if len(parts) >= 5 and parts[2] == "resolve":
            path = self.root / parts[0] / parts[1] / Path(*parts[4:])
            if path.is_file():
                return self._send(200, path.read_bytes(), "application/octet-stream",
                                  {"X-Repo-Commit": "0" * 40, "ETag": '"x"'})
        return self._send(404, b'{"error": "Entry not found"}', "application/json",
                          {"X-Error-Code": "EntryNotFound"})

    def do_POST(self) -> None:
        """Enough of the Hub's write API for ``HfApi.create_repo`` / ``create_commit`` with small
        files (all "regular" uploads, committed as base64 in the NDJSON commit body)."""
        url = urllib.parse.urlparse(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((url.path, self.headers.get("Authorization")))
        if parts == ["api", "repos", "create"]:
            data = json.loads(body)
            name = data["name"] if "/" in data["name"] else f"{data.get('organization')}/{data['name']}"
            (self.root / name).mkdir(parents=True, exist_ok=True)
            return self._send(200, json.dumps({"url": f"http://{self.headers['Host']}/{name}"}).encode())
        if parts[:2] == ["api", "validate-yaml"]:
            return self._send(200, b"{}")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(body)["files"]]
            return self._send(200, json.dumps({"files": files}).encode())
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            import base64

            repo = self.root / parts[2] / parts[3]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = repo / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            answer = {"commitUrl": f"http://{self.headers['Host']}/{parts[2]}/{parts[3]}/commit/{'1' * 40}",
                      "commitOid": "1" * 40, "success": True}
            return self._send(200, json.dumps(answer).encode())
        return self._send(404, b'{"error": "not found"}')

    def _send(self, code: int, body: bytes, kind: str = "application/json", extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def hub_server(root: Path) -> Iterator[tuple[str, list]]:
    seen: list = []
    handler = type("Hub", (HubHandler,), {"root": root, "seen": seen})
    with serve_http(handler) as url:
        yield url, seen
