"""Loading adapters on first use (``serve --adapter-source LOCATION``), with LRU eviction.

A request naming an adapter that is not loaded asks ``OnDemand.ensure``: the adapter is looked up
under each source in turn (``SOURCE/NAME``: a folder, ``s3://``, ``http(s)://`` or ``hf://``),
fetched into the verified cache on a separate thread (the model's worker thread keeps answering
the requests in flight), then put into the model on the worker thread like ``POST /v1/adapters``
does. Concurrent requests for the same adapter share one load. At most ``max_loaded_adapters``
adapters loaded this way stay in the model: the least recently used one that no request holds
leaves (start-up and ``POST``-ed adapters are never evicted). Refusals are 4xx with the reason:
404 when no source has the name, 422 when the copy fails its checksum or was trained on another
base. ``/metrics`` counts loads, cache hits, failures and evictions.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from prometheus_client import Counter

from ..sharing import AdapterNotFound, is_remote, local_folder, pull
from ..sharing.locations import local_path


def source_location(path: str, config: Any) -> str | None:
    """``POST /v1/adapters`` may name a remote location under one of the adapter sources (remote
    locations elsewhere are refused like folders outside ``--allowed-root``)."""
    if not is_remote(path):
        return None
    for source in getattr(config, "adapter_sources", ()):
        if is_remote(source) and path.startswith(source.rstrip("/") + "/") and ".." not in path.split("/"):
            return path
    raise HTTPException(403, f"'{path}' is not under an adapter source of this server (--adapter-source); "
                             "load from a listed source or an --allowed-root folder.")


class OnDemand:
    """The adapters loaded from sources, in least-recently-used order, and the loads under way."""

    def __init__(self, server: Any, sources: tuple[str, ...], max_loaded: int):
        self.server, self.sources, self.max_loaded = server, sources, max_loaded
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.pending: dict[str, asyncio.Future] = {}
        registry = server.metrics.registry
        self.loads = Counter("adapterkit_adapter_loads", "Adapters loaded from --adapter-source on first use",
                             registry=registry)
        self.cache_hits = Counter("adapterkit_adapter_cache_hits", "On-demand loads answered by the local cache "
                                  "(nothing downloaded)", registry=registry)
        self.evictions = Counter("adapterkit_adapter_evictions", "Adapters evicted to stay within "
                                 "--max-loaded-adapters", registry=registry)
        self.failures = Counter("adapterkit_adapter_load_failures", "On-demand loads refused", ["reason"],
                                registry=registry)

    @classmethod
    def for_config(cls, server: Any) -> OnDemand | None:
        sources = getattr(server.config, "adapter_sources", ())
        if not sources:
            return None
        # under Ray, Ray's multiplexing keeps the LRU (max_num_models_per_replica) and calls drop()
        return cls(server, tuple(sources), 1 << 30 if server.config.ray else server.config.max_loaded_adapters)

    def find(self, name: str) -> tuple[Path, bool]:
        """The verified local folder of ``name`` from the first source that has it; whether it
        came from the cache. Runs on a thread of its own (network and disk)."""
        for source in self.sources:
            location = source.rstrip("/") + "/" + name
            if is_remote(location):
                try:
                    fetched = pull(location)
                except AdapterNotFound:
                    continue
                return fetched.folder, fetched.hit
            folder = local_path(location)
            if (folder / "adapter_config.json").is_file():
                return Path(local_folder(folder)), True
        raise AdapterNotFound(f"No adapter named '{name}' is loaded or published under the adapter sources "
                              f"({', '.join(self.sources)}); check the name (adapterkit ls SOURCE lists them).")

    async def ensure(self, name: str) -> None:
        """Make ``name`` visible in the registry, loading it from a source if need be. No ``await``
        separates the return from the caller's ``registry.acquire``, so nothing evicts it between."""
        while True:
            if name in self.lru or self._visible(name):
                if name in self.lru:
                    self.lru.move_to_end(name)
                return
            if name not in self.pending:
                self.pending[name] = asyncio.ensure_future(self._load(name))
            await asyncio.shield(self.pending[name])  # raises the load's refusal to every waiter

    def _visible(self, name: str) -> bool:
        try:
            self.server.registry.get(name)
        except HTTPException:
            return False
        return True

    async def _load(self, name: str) -> None:
        server = self.server
        try:
            try:
                folder, hit = await asyncio.to_thread(self.find, name)
            except AdapterNotFound as err:
                self.failures.labels("unknown").inc()
                raise HTTPException(404, str(err)) from None
            except Exception as err:  # the source's fault (damaged copy, unreachable store): never a 500
                raise self._refused(name, err) from None
            await self._reserve(name)
            try:
                described = await server.on_worker(server.engine.load, name, str(folder))
            except Exception as err:  # the folder's fault (the model is left as it was): the name is free again
                server.registry.unreserve(name)
                raise self._refused(name, err) from None
            server.registry.add(name, described)
            self.lru[name] = None
            self.loads.inc()
            if hit:
                self.cache_hits.inc()
            server.metrics.adapters_loaded.set(len(server.registry))
            await self._evict(keep=name)
        finally:
            del self.pending[name]

    def _refused(self, name: str, err: Exception) -> HTTPException:
        self.failures.labels("refused").inc()
        return HTTPException(422, f"Cannot load adapter '{name}' from the adapter sources: {err}")

    async def _reserve(self, name: str, patience: float = 10.0) -> None:
        """Claim the name; an evicted adapter still leaving the model frees it within moments."""
        for _ in range(int(patience / 0.01)):
            try:
                return self.server.registry.reserve(name)
            except HTTPException:
                await asyncio.sleep(0.01)
        self.server.registry.reserve(name)  # still taken: the 409 names it

    def loaded(self, name: str) -> bool:
        return name in self.lru

    async def drop(self, name: str) -> None:
        """Take ``name`` out (Ray evicted it): hidden at once, removed when no request holds it."""
        if name in self.lru:
            del self.lru[name]
            if self.server.registry.hide(name):
                await self.server.remove(name)
            self.server.metrics.adapters_loaded.set(len(self.server.registry))

    async def _evict(self, keep: str) -> None:
        """Down to ``max_loaded``: drop the least recently used adapters that no request holds."""
        server = self.server
        while len(self.lru) > self.max_loaded:
            idle = next((n for n in self.lru if n != keep and not server.registry.held(n)), None)
            if idle is None:
                return  # every other one is in use: over the limit until they are released
            del self.lru[idle]
            self.evictions.inc()
            if server.registry.hide(idle):
                await server.remove(idle)
            server.metrics.adapters_loaded.set(len(server.registry))
