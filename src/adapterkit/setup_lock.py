"""The setup lock: forwards never run while the adapter setup changes.

A setup change (add / delete / load / activate / merge / train / disable ... an adapter or head)
rebuilds the slots' plans and hooks, and a forward in flight that saw half of it would use some
layers' old plans and some layers' new ones: a wrong answer without an error. So each
``AdapterModel`` has a reader-writer lock: forwards (``forward``, ``generate``) take the read side
and run together; setup changes take the write side, wait for the forwards in flight to finish,
and hold new ones back until the change is complete. A forward then checks its adapter names
against one consistent setup: it either runs with the adapter whole, or fails with a clean
``AdapterError`` ("No adapter named ...") when the adapter is gone.

* Writers are preferred (a waiting change stops new forwards from starting), so a stream of
  forwards cannot starve a change.
* Both sides are re-entrant per thread: a change may call other changes (``add_adapter`` with
  ``overwrite`` deletes first) and run forwards; a forward may call nested forwards.
* A setup change from inside a forward of the same model (a hook of the user's) would wait for
  itself; it is refused with an ``AdapterError`` instead.

The lock belongs to the handle, created on first use; copies and pickles of a model get a fresh
one (``__getstate__``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, TypeVar

from .errors import AdapterError

F = TypeVar("F", bound=Callable[..., Any])


class SetupLock:
    """A writer-preferring, per-thread re-entrant reader-writer lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads inside a read
        self._writer: "int | None" = None  # the thread inside a write
        self._waiting_writers = 0
        self._local = threading.local()  # this thread's read / write depth

    def __getstate__(self) -> dict:
        return {"fresh": True}  # a truthy state, so that copy and pickle call __setstate__

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _depth(self, kind: str) -> int:
        return getattr(self._local, kind, 0)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the read side (forwards)."""
        if self._depth("reads") or self._writer == threading.get_ident():
            self._local.reads = self._depth("reads") + 1  # nested: already inside
            try:
                yield
            finally:
                self._local.reads -= 1
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self, what: str = "change the adapter setup") -> Iterator[None]:
        """Hold the write side (setup changes)."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if self._depth("reads"):
            raise AdapterError(f"Cannot {what} from inside a forward of the same model (it would wait for itself); "
                               "make the change before or after the forward.")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


_CREATE = threading.Lock()


def lock_of(handle: Any) -> SetupLock:
    """The handle's lock, created on first use."""
    lock = handle.__dict__.get("_setup_lock")
    if lock is None:
        with _CREATE:
            lock = handle.__dict__.setdefault("_setup_lock", SetupLock())
    return lock


def setup_change(method: F) -> F:
    """Run ``method`` of an ``AdapterModel`` on the write side of its setup lock."""
    what = f"call {method.__name__.lstrip('_')}()"

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with lock_of(self).writing(what):
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def forward_call(method: F) -> F:
    """Run ``method`` of an ``AdapterModel`` on the read side of its setup lock."""
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with lock_of(self).reading():
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


__all__ = ["SetupLock", "forward_call", "lock_of", "setup_change"]
