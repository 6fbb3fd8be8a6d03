"""Who may change the server and what it may read: the admin bearer token, the allowed roots
for adapter folders, adapter names, and the request body size limit."""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from fastapi import HTTPException

_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def check_admin(authorization: Optional[str], token: Optional[str]) -> None:
    """Let the request through only with ``Authorization: Bearer <token>``; with no token
    configured (or an empty one) the admin endpoints are off (403): no header can match it."""
    if not token or not token.strip():
        raise HTTPException(403, "The admin endpoints are off: start the server with --admin-token TOKEN "
                                 "(or ADAPTERKIT_ADMIN_TOKEN) to load and unload adapters.")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "Missing or wrong admin token: send 'Authorization: Bearer <token>'.",
                            headers={"WWW-Authenticate": "Bearer"})


def check_name(name: str) -> str:
    """An adapter name: letters, digits, '_' and '-' only (no path separators), 64 at most."""
    if not _NAME.match(name):
        raise HTTPException(422, f"Invalid adapter name {name[:80]!r}: use 1-64 letters, digits, '_' or '-' "
                                 "(no '/', '\\\\' or '.').")
    return name


def check_path(path: str, roots: Sequence[str]) -> Path:
    """The adapter folder, resolved (symbolic links followed), if it and everything in it lie
    under an allowed root: a file inside the folder that is a link to somewhere else is refused
    too (every file a load may read is resolved, not only the folder)."""
    if not roots:
        raise HTTPException(403, "Loading adapters over HTTP is off: start the server with --allowed-root DIR.")
    if "\x00" in path:
        raise HTTPException(422, "The adapter path contains a NUL character.")
    resolved = Path(os.path.realpath(path))
    real_roots = [os.path.realpath(root) for root in roots]
    root = next((r for r in real_roots if resolved.is_relative_to(r)), None)
    if root is None:
        raise HTTPException(403, f"'{path}' is outside the allowed roots; put the adapter under one of: "
                                 f"{', '.join(roots)}.")
    escaping = _first_escape(resolved, root)
    if escaping is not None:
        raise HTTPException(403, f"'{path}' holds '{escaping}', a link to a file outside the allowed roots; copy "
                                 "the file into the adapter folder instead of linking it.")
    return resolved


def _first_escape(folder: Path, root: str, limit: int = 10_000) -> Optional[str]:
    """The first entry under ``folder`` (recursively, linked folders followed once) whose real
    path is not under ``root``; a folder of more than ``limit`` entries is refused as a whole."""
    seen, count = {str(folder)}, 0
    for here, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for entry in dirs + files:
            count += 1
            full = os.path.join(here, entry)
            real = os.path.realpath(full)
            if count > limit:
                return f"{os.path.relpath(full, folder)} (more than {limit} entries: not an adapter folder)"
            if not Path(real).is_relative_to(root):
                return os.path.relpath(full, folder)
            if entry in dirs and real not in seen:
                seen.add(real)
                kept.append(entry)
        dirs[:] = [d for d in dirs if d in kept]
    return None


class BodyLimit:
    """ASGI middleware: a request body longer than ``max_bytes`` answers 413 (by its
    Content-Length, or while it is read when it has none)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _reject(send, self.max_bytes)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"The request body is over {self.max_bytes} bytes.")
            return message

        return await self.app(scope, counted, send)


async def _reject(send, max_bytes: int) -> None:
    from starlette.responses import JSONResponse  # noqa: PLC0415 - optional dependency: the serve extra (fastapi)

    response = JSONResponse({"detail": f"The request body is over {max_bytes} bytes; send fewer or shorter "
                                       "texts."}, status_code=413)
    await response({"type": "http"}, None, send)
