"""Which adapters requests may use, and which are held by requests under way.

A request *acquires* its adapter when it is admitted and *releases* it when it is answered.
Unloading hides an adapter at once (new requests get 404) but the adapter stays in the model
until the last request holding it is done, so a request that started with an adapter finishes
with it. The model itself is changed by the engine, on the worker thread, never here.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Optional

from fastapi import HTTPException


class Registry:
    """Visible adapters (name -> description) and the requests holding each."""

    def __init__(self) -> None:
        self._visible: dict[str, dict[str, Any]] = {}
        self._held: Counter[str] = Counter()
        self._leaving: set[str] = set()
        self._loading: set[str] = set()
        self._lock = threading.Lock()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": n, **d} for n, d in sorted(self._visible.items())]

    def get(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self._visible:
                raise HTTPException(404, f"No adapter named '{name}'; loaded: {', '.join(sorted(self._visible)) or 'none'}"
                                         " (GET /v1/adapters lists them).")
            return self._visible[name]

    def __len__(self) -> int:
        return len(self._visible)

    def held(self, name: str) -> bool:
        """Whether a request under way holds ``name``."""
        with self._lock:
            return self._held[name] > 0

    def reserve(self, name: str) -> None:
        """Hold ``name`` for a load under way; refuse a name that is taken, being loaded, or still
        leaving the model (409). ``add`` or ``unreserve`` ends the reservation."""
        with self._lock:
            if name in self._visible or name in self._leaving or name in self._loading:
                raise HTTPException(409, f"An adapter named '{name}' is loaded (or being loaded, or still finishing "
                                         "requests); DELETE it first or choose another name.")
            self._loading.add(name)

    def unreserve(self, name: str) -> None:
        """The load under way failed: the name is free again."""
        with self._lock:
            self._loading.discard(name)

    def add(self, name: str, description: dict[str, Any]) -> None:
        with self._lock:
            self._loading.discard(name)
            self._visible[name] = description

    def acquire(self, name: Optional[str]) -> dict[str, Any]:
        """Hold ``name`` for one request (``None``: the bare base); its description."""
        if name is None:
            return {}
        with self._lock:
            if name not in self._visible:
                raise HTTPException(404, f"No adapter named '{name}'; loaded: {', '.join(sorted(self._visible)) or 'none'}"
                                         " (GET /v1/adapters lists them).")
            self._held[name] += 1
            return self._visible[name]

    def release(self, name: Optional[str]) -> bool:
        """Let go of ``name``; ``True`` when it was the last hold of an adapter being unloaded
        (the caller then removes it from the model)."""
        if name is None:
            return False
        with self._lock:
            self._held[name] -= 1
            if self._held[name] > 0:
                return False
            del self._held[name]
            return name in self._leaving

    def hide(self, name: str) -> bool:
        """Unload: no new request gets ``name``; ``True`` when no request holds it (remove now)."""
        with self._lock:
            if name not in self._visible:
                raise HTTPException(404, f"No adapter named '{name}'.")
            del self._visible[name]
            self._leaving.add(name)
            return self._held[name] == 0

    def gone(self, name: str) -> None:
        """The adapter has left the model; its name is free again."""
        with self._lock:
            self._leaving.discard(name)
