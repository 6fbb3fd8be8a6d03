"""Deprecated import paths of public names that moved, kept for one release.

``adapterkit.adapterdrop`` (shown in 0.1's README) became ``adapterkit.train.adapterdrop``
(the ``Trainer`` callback) and ``adapterkit.composition.adapterdrop`` (the runtime). The old
path is a module object registered in ``sys.modules`` (no file at the old path, so the move
stays a plain rename in git); reading a name from it emits a ``DeprecationWarning`` naming the
new path, then imports it from there.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

#: old module -> {name: new module}
MOVED = {
    "adapterkit.adapterdrop": {
        "AdapterDropCallback": "adapterkit.train.adapterdrop",
        "AdapterDrop": "adapterkit.composition.adapterdrop",
    },
}


class MovedModule(types.ModuleType):
    """An old module path whose names now live elsewhere (module docstring)."""

    def __init__(self, name: str, names: dict[str, str]):
        super().__init__(name, f"Deprecated: moved to {', '.join(sorted(set(names.values())))}.")
        self._names = names

    def __getattr__(self, attr: str) -> Any:
        target = self._names.get(attr)
        if target is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        warnings.warn(f"{self.__name__}.{attr} is deprecated and will be removed in the next release; "
                      f"import it from {target}.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), attr)

    def __dir__(self) -> list[str]:
        return sorted(self._names)


def install() -> None:
    """Register the old paths (called once by ``adapterkit/__init__.py``)."""
    for old, names in MOVED.items():
        sys.modules.setdefault(old, MovedModule(old, names))
