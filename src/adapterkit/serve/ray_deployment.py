"""``adapterkit serve --ray``: the same app as a Ray Serve application, scaled out over replicas.

Two deployments (``build_application``):

* ``AdapterIngress`` takes every HTTP request from Ray's proxy, reads the ``adapter`` of a JSON
  body (the ``model`` of an OpenAI ``/v1/completions`` or ``/v1/chat/completions`` body), and
  hands the request unchanged to the model deployment through a handle with
  ``multiplexed_model_id=adapter``: Ray's model multiplexing routes it to a replica that already
  holds that adapter (or, when none does, to the least loaded one). Requests without an adapter
  (``GET /v1/adapters``, ``/openapi.json``, generate with the bare base) go to any replica;
  ``GET /metrics`` and ``GET /health`` the ingress answers itself (below).
* ``AdapterReplica`` (``replicas`` of them, across the cluster's nodes) holds one base model and
  runs the single-process server's FastAPI app (``app.create_app``) in process: the same routes,
  batcher, limits and answers. Its ``@serve.multiplexed`` loader puts an adapter into the model on
  first use; Ray keeps at most ``max_num_models_per_replica`` per replica and evicts the least
  recently used (removed from the model once no request in this replica holds it). Every answer
  names its replica and the adapters it holds (``x-adapterkit-replica``,
  ``x-adapterkit-resident``), so the multiplexing can be watched.

``GET /metrics`` and ``GET /health`` answer for the whole deployment: every replica reports its
metrics and resident adapters once a second to the application's ``MetricsBoard`` actor
(``ray_metrics.py``) and the ingress answers from the board.

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
import logging
import time
from typing import Any, Optional

import ray
import torch
from fastapi import HTTPException
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .config import ServeConfig
from .engine import build_engine
from .ray_metrics import PUSH_SECONDS, STALE_SECONDS, IngressMetrics, MetricsBoard, board_name, deployment_health
from .registry import Registry

_log = logging.getLogger("ray.serve")
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


_Board = ray.remote(num_cpus=0)(MetricsBoard)


def _board(app_name: str):
    """The application's ``MetricsBoard`` actor, started by whoever asks first. Not detached: it
    ends with the process that started it (and with the application), and the next to ask starts
    another, to which the replicas report again within a second."""
    return _Board.options(name=board_name(app_name), get_if_exists=True).remote()


def _gone(err: Exception) -> bool:
    """Ray says the board's actor has died. Nothing else drops a handle: a timeout may be a board
    just started on a busy node, and dropping the handle of a board this process started would end
    it (a non-detached actor lives while its starter holds a handle)."""
    return isinstance(err, ray.exceptions.RayActorError)


class _Reporter:
    """Sends a replica's report (``ReplicaServer.report``) to the board every ``PUSH_SECONDS``
    from the replica's event loop; ``close`` takes the replica off the board."""

    def __init__(self, app_name: str, replica: str, report):
        self.app_name, self.replica, self.report, self.board, self.failing = app_name, replica, report, None, False
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def push(self) -> None:
        try:
            if self.board is None:
                self.board = _board(self.app_name)
            # awaited without a time limit: one report on its way at a time, never a backlog (a dead
            # board raises ActorDiedError)
            await self.board.put.remote(self.replica, time.time(), *self.report())
        except Exception as err:  # noqa: BLE001 - reported below; the replica serves on
            if not self.failing:
                _log.warning("adapterkit: replica %s cannot report to %s: %r", self.replica,
                             board_name(self.app_name), err)
            self.failing = True
            if _gone(err):  # its starter stopped: find or start another next time
                self.board = None
        else:
            self.failing = False

    async def run(self) -> None:
        while True:
            await self.push()
            await asyncio.sleep(PUSH_SECONDS)

    async def close(self) -> None:
        self.task.cancel()
        if self.board is not None:
            try:
                await asyncio.wait_for(self.board.remove.remote(self.replica), 5)
            except Exception:  # noqa: BLE001 - no board: nothing to remove; silent replicas age out anyway
                pass


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

    def report(self) -> tuple[str, dict]:
        """This replica's Prometheus exposition and state (resident adapters, queue) for the board."""
        queue = self.server.batcher.depth if self.server.batcher is not None else 0
        return self.server.metrics.render().decode(), {"resident": sorted(self.resident), "queue": queue}

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
            context = serve.get_replica_context()  # the constructor runs on the replica's event loop
            self.reporter = _Reporter(context.app_name, context.replica_id.unique_id, self.inner.report)

        async def __del__(self) -> None:  # Ray Serve awaits it when it stops the replica
            await self.reporter.close()
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
        def __init__(self, replicas, max_body_bytes: int, adapters: tuple[str, ...] = (), model: str = ""):
            self.replicas, self.max_body_bytes, self.adapters = replicas, max_body_bytes, set(adapters)
            self.model, self.metrics, self.board = model, IngressMetrics(), None
            self.app_name = serve.get_replica_context().app_name

        async def reports(self) -> dict:
            """The live replicas' reports (none while the board cannot be reached: logged)."""
            for attempt in range(2):  # a board that has gone: once more with the one found or started now
                try:
                    if self.board is None:
                        self.board = _board(self.app_name)
                    return await asyncio.wait_for(self.board.read.remote(STALE_SECONDS), 10)
                except Exception as err:  # noqa: BLE001 - answered as no live replica (/health 503), logged
                    if attempt or not _gone(err):
                        _log.warning("adapterkit: the metrics board %s cannot be read: %r",
                                     board_name(self.app_name), err)
                        if _gone(err):
                            self.board = None
                        break
                    self.board = None
            return {}

        async def __call__(self, request: Request) -> Response:
            response = await self.answer(request)
            self.metrics.observe(request.url.path, response.status_code)
            return response

        async def answer(self, request: Request) -> Response:
            if request.method == "GET" and request.url.path == "/metrics":  # the whole deployment's
                return Response(self.metrics.render(await self.reports()), media_type=self.metrics.content_type)
            if request.method == "GET" and request.url.path == "/health":
                status, health = deployment_health(await self.reports(), self.model, len(self.adapters))
                return JSONResponse(health, status)
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

    return AdapterIngress.bind(AdapterReplica.bind(config), config.max_body_bytes, tuple(config.adapters),
                               str(config.model))


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
