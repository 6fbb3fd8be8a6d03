"""``adapterkit serve --ray``: the same app as a Ray Serve application, scaled out over replicas.

Two deployments (``build_application``):

* ``AdapterIngress`` takes every HTTP request from Ray's proxy, reads the ``adapter`` of a JSON
  body (the ``model`` of an OpenAI ``/v1/completions`` or ``/v1/chat/completions`` body), and
  hands the request unchanged to the model deployment through a handle with
  ``multiplexed_model_id=adapter``: Ray's model multiplexing routes it to a replica that already
  holds that adapter (or, when none does, to the least loaded one). Requests without an adapter
  (``GET /v1/adapters``, ``/health``, ``/metrics``, ``/openapi.json``, generate with the bare base)
  go to any replica.
* ``AdapterReplica`` (``replicas`` of them, across the cluster's nodes) holds one base model and
  runs the single-process server's FastAPI app (``app.create_app``) in process: the same routes,
  batcher, limits and answers. Its ``@serve.multiplexed`` loader puts an adapter into the model on
  first use; Ray keeps at most ``max_num_models_per_replica`` per replica and evicts the least
  recently used (removed from the model once no request in this replica holds it). Every answer
  names its replica and the adapters it holds (``x-adapterkit-replica``,
  ``x-adapterkit-resident``), so the multiplexing can be watched.

The OpenAI endpoints (``openai_api.py``) run in every replica like the rest of the app: each
replica's ``/v1/models`` lists the configuration's adapters, i.e. the whole deployment's; a stream
(``"stream": true``) passes through the ingress chunk by chunk (a streaming handle,
``stream_asgi``).

The adapters are the configuration's (their folders must be readable on every node, e.g. a
shared file system); loading and unloading over HTTP is off under Ray (a POST or DELETE on
``/v1/adapters`` answers 403 and says how to redeploy).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import torch
from fastapi import HTTPException
from ray import serve
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .config import ServeConfig
from .engine import build_engine
from .registry import Registry

_ADAPTER_PATHS = ("/v1/classify", "/v1/generate")
_MODEL_PATHS = ("/v1/completions", "/v1/chat/completions")  # OpenAI's: the adapter is "model" (openai_api.py)


def _adapter_of(path: str, body: bytes) -> str:
    """The ``adapter`` field of a classify / generate body, the ``model`` field of an OpenAI
    completion ('' when absent or unreadable: the replica's app then answers the request, 400 or
    422 included)."""
    key = "adapter" if path in _ADAPTER_PATHS else "model" if path.rstrip("/") in _MODEL_PATHS else None
    if key is None:
        return ""
    try:
        adapter = json.loads(body).get(key)
    except (ValueError, AttributeError, RecursionError):  # RecursionError: [[[[...]]]]; the replica answers 400
        return ""
    return adapter if isinstance(adapter, str) else ""


async def call_asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """One HTTP request through an ASGI ``app`` in this process: (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query, "headers": headers,
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 0)}
    answered, sent_body = asyncio.Event(), False
    status, out_headers, chunks = 500, [], []

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # the client stays connected until its answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status, out_headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                answered.set()

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return status, out_headers, b"".join(chunks)


async def stream_asgi(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes):
    """Like ``call_asgi``, but yields ``(status, headers)`` first and then each body chunk as soon
    as the app sends it (a server-sent event stream passes through as it is produced). Leaving
    the iteration early tells the app its client has gone."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query, "headers": headers,
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 0)}
    queue: asyncio.Queue = asyncio.Queue()
    gone, sent_body = asyncio.Event(), False

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            queue.put_nowait((message["status"], list(message.get("headers", []))))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                queue.put_nowait(message["body"])
            if not message.get("more_body", False):
                queue.put_nowait(None)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        gone.set()  # the client has gone (or the answer is complete): the app stops
        try:
            await asyncio.wait_for(task, 10)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app's own failure was answered already
            task.cancel()


def _streams(path: str, body: bytes) -> bool:
    """An OpenAI completion asking for ``"stream": true``."""
    if path.rstrip("/") not in _MODEL_PATHS:
        return False
    try:
        return json.loads(body).get("stream") is True
    except (ValueError, AttributeError):
        return False


class _Resident:
    """What Ray's multiplexer holds for one adapter of a replica. Ray awaits ``__del__`` when it
    evicts the adapter; it is an instance attribute so that garbage collection never calls it."""

    def __init__(self, name: str, replica: "ReplicaServer"):
        self.name = name

        async def evict() -> None:
            await replica.evict(name)

        self.__del__ = evict


class ReplicaServer:
    """One replica's model, app and resident adapters (the body of ``AdapterReplica``)."""

    def __init__(self, config: ServeConfig):
        from .app import create_app  # noqa: PLC0415 - optional dependency: the serve extra (fastapi)

        torch.set_num_threads(config.threads)
        self.config = config
        self.engine = build_engine(config)  # every adapter once: checks the folders, describes them
        registry = Registry()
        for name in config.adapters:
            registry.add(name, self.engine.describe(name))
            self.engine.unload(name)  # loaded again on first use (multiplexing)
        self.resident: set[str] = set()
        self.evicting: set[str] = set()
        self.app = create_app(self.engine, registry=registry, hot_load=False)
        self.server = self.app.app.state.server
        self._lifespan: Optional[Any] = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        """Start the app's batcher and worker thread (once, on the replica's event loop)."""
        async with self._starting:
            if self._lifespan is None:
                lifespan = self.app.app.router.lifespan_context(self.app.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def stop(self) -> None:
        """Stop the batcher and the worker thread (the replica is shutting down)."""
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)

    async def load(self, name: str) -> _Resident:
        """Put ``name`` into the model (Ray's multiplexed loader)."""
        await self.start()
        self.evicting.discard(name)
        if name not in self.resident:
            if name in self.config.adapters:
                await self.server.on_worker(self.engine.load, name, self.config.adapters[name])
            else:  # --adapter-source: fetched into this replica's cache (HTTPException 404 / 422 if refused)
                await self.server.on_demand.ensure(name)
            self.resident.add(name)
        return _Resident(name, self)

    async def evict(self, name: str) -> None:
        """Ray evicted ``name``: remove it from the model now, or when its last request is done."""
        self.evicting.add(name)
        await self._remove_idle()

    async def _remove_idle(self) -> None:
        for name in sorted(self.evicting):
            if name in self.resident and not self.server.registry.held(name):
                self.evicting.discard(name)
                self.resident.discard(name)  # before the unload: a new load queues behind it
                if name in self.config.adapters:
                    await self.server.on_worker(self.engine.unload, name)
                else:
                    await self.server.on_demand.drop(name)

    async def handle(self, adapter: str, ensure, method: str, path: str, query: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, list, bytes]:
        """One request: the adapter made resident (``ensure``: Ray's multiplexed loader) and held
        while the app answers."""
        await self.start()
        sourced = bool(adapter) and adapter not in self.config.adapters and self.server.on_demand is not None
        held = adapter if adapter in self.config.adapters or sourced else None
        acquired = False
        if held is not None and not sourced:
            self.server.registry.acquire(held)  # the app's own hold comes later: no eviction in between
            acquired = True
        try:
            if held is not None:
                try:
                    await ensure(held)
                except HTTPException as err:  # an adapter source refused it: 404 / 422 with the reason
                    return err.status_code, [(b"content-type", b"application/json")], \
                        json.dumps({"detail": err.detail}).encode()
                if not acquired:
                    self.server.registry.acquire(held)  # no await since ensure: nothing evicted it
                    acquired = True
            status, out, content = await call_asgi(self.app, method, path, query, headers, body)
        finally:
            if acquired:
                self.server.registry.release(held)
            await self._remove_idle()
        replica = serve.get_replica_context().replica_id.unique_id
        out += [(b"x-adapterkit-replica", replica.encode()),
                (b"x-adapterkit-resident", ",".join(sorted(self.resident)).encode())]
        return status, out, content


    async def handle_stream(self, adapter: str, ensure, method: str, path: str, query: bytes,
                            headers: list[tuple[bytes, bytes]], body: bytes):
        """``handle`` for a streamed answer: yields ``(status, headers)``, then the body's chunks."""
        await self.start()
        held = adapter if adapter in self.config.adapters else None
        if held is not None:
            self.server.registry.acquire(held)
        try:
            if held is not None:
                await ensure(held)
            replica = serve.get_replica_context().replica_id.unique_id
            first = True
            async for item in stream_asgi(self.app, method, path, query, headers, body):
                if first:
                    status, out = item
                    item, first = (status, out + [(b"x-adapterkit-replica", replica.encode()),
                                                  (b"x-adapterkit-resident",
                                                   ",".join(sorted(self.resident)).encode())]), False
                yield item
        finally:
            if held is not None:
                self.server.registry.release(held)
            await self._remove_idle()


def build_application(config: ServeConfig):
    """The Ray Serve application (``serve.run`` it): ingress + ``config.replicas`` model replicas."""

    @serve.deployment(name="AdapterReplica", num_replicas=config.replicas,
                      ray_actor_options={"num_cpus": config.replica_cpus},
                      max_ongoing_requests=max(config.queue_size, 1))
    class AdapterReplica:
        def __init__(self, config: ServeConfig):
            self.inner = ReplicaServer(config)

        async def __del__(self) -> None:  # Ray Serve awaits it when it stops the replica
            await self.inner.stop()

        @serve.multiplexed(max_num_models_per_replica=config.max_num_models_per_replica)
        async def get_adapter(self, name: str) -> _Resident:
            return await self.inner.load(name)

        async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> tuple:
            adapter = serve.get_multiplexed_model_id()
            return await self.inner.handle(adapter, self.get_adapter, method, path, query, headers, body)

        async def stream(self, method: str, path: str, query: bytes, headers: list, body: bytes):
            adapter = serve.get_multiplexed_model_id()
            async for item in self.inner.handle_stream(adapter, self.get_adapter, method, path, query, headers, body):
                yield item

    @serve.deployment(name="AdapterIngress", ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(4 * config.queue_size, 1))
    class AdapterIngress:
        def __init__(self, replicas, max_body_bytes: int, adapters: tuple[str, ...] = ()):
            self.replicas, self.max_body_bytes, self.adapters = replicas, max_body_bytes, set(adapters)

        async def __call__(self, request: Request) -> Response:
            body = bytearray()
            async for chunk in request.stream():  # no further than the limit: the app answers 413
                body += chunk
                if len(body) > self.max_body_bytes:
                    break
            adapter = _adapter_of(request.url.path, bytes(body))  # the base's id or an unknown name: any replica
            handle = self.replicas.options(multiplexed_model_id=adapter) if adapter in self.adapters else self.replicas
            if _streams(request.url.path, bytes(body)):  # chunks pass through as the replica produces them
                chunks = handle.options(stream=True).stream.remote(
                    request.method, request.url.path, request.url.query.encode(), list(request.headers.raw),
                    bytes(body))
                status, headers = await chunks.__anext__()
                streamed = StreamingResponse(chunks, status)
                streamed.raw_headers = [(k, v) for k, v in headers]
                return streamed
            status, headers, content = await handle.handle.remote(
                request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), bytes(body))
            response = Response(content, status)
            response.raw_headers = [(k, v) for k, v in headers]
            return response

    return AdapterIngress.bind(AdapterReplica.bind(config), config.max_body_bytes, tuple(config.adapters))


def run(config: ServeConfig, *, blocking: bool = True) -> str:
    """Connect to Ray (``config.ray_address``; none: a local cluster), start Serve's HTTP proxy on
    ``config.host:config.port`` and deploy; blocks until interrupted unless ``blocking=False``.
    Returns the URL."""
    import ray  # noqa: PLC0415 - optional dependency: the ray extra

    if not ray.is_initialized():
        ray.init(address=config.ray_address, include_dashboard=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config), name="adapterkit", route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    if blocking:
        print(f"adapterkit serving on {url} with {config.replicas} Ray Serve replica(s); Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
