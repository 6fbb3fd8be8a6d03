"""The FastAPI app: ``create_app(engine)`` and its routes.

Every request is answered with JSON; client errors get a 4xx naming the problem (never a 500):
malformed JSON 400, an unknown adapter 404, too many texts / too long a text / too big a body 413,
invalid fields 422, a full queue 429, a request past its timeout 504. ``POST`` and ``DELETE
/v1/adapters`` need the admin bearer token (``security.check_admin``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .._version import __version__
from ..errors import AdapterError
from .batcher import Batcher, Job, QueueFull
from .engine import ClassifyJob, ClassifyKey, Engine, GenerateJob, GenerateKey
from .metrics import Metrics
from ..sharing import local_folder
from .on_demand import OnDemand, source_location
from .openai_api import http_error, install, is_openai_path, validation_error
from .openai_schemas import error_body
from .registry import Registry
from .schemas import (NAME_PATTERN, AdapterInfo, ClassifyRequest, ClassifyResponse, Error, GenerateRequest,
                      GenerateResponse, Health, LoadRequest, one_line, printable)
from .security import BodyLimit, check_admin, check_name, check_path


class _Server:
    """What the routes share: engine, registry, batcher, metrics and the worker thread."""

    def __init__(self, engine: Engine, registry: Optional[Registry] = None):
        self.engine, self.config = engine, engine.config
        self.metrics = Metrics()
        if registry is None:
            registry = Registry()
            for name in engine.model.records:
                registry.add(name, engine.describe(name))
        self.registry = registry
        self.metrics.adapters_loaded.set(len(self.registry))
        self.executor: Optional[ThreadPoolExecutor] = None
        self.batcher: Optional[Batcher] = None
        self.on_demand = OnDemand.for_config(self)  # serve --adapter-source: load on first use

    async def acquire(self, name: Optional[str]) -> dict[str, Any]:
        """Hold ``name`` for a request, loading it from an adapter source first if need be."""
        if self.on_demand is not None and name is not None:
            await self.on_demand.ensure(name)
        return self.registry.acquire(name)

    async def on_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def remove(self, name: str) -> None:
        """Take an unloaded adapter out of the model (no request holds it any more)."""
        try:
            await self.on_worker(self.engine.unload, name)
        finally:
            self.registry.gone(name)

    async def release(self, name: Optional[str]) -> None:
        if self.registry.release(name):
            await self.remove(name)

    async def run(self, request: Request, job: Job) -> Any:
        """Queue ``job`` and wait for its result, the request's timeout or the client leaving."""
        try:
            future = self.batcher.submit(job)
        except QueueFull:
            raise HTTPException(429, "The server is busy (its queue is full); retry shortly.",
                                headers={"Retry-After": "1"}) from None
        if isinstance(job.payload, GenerateJob):
            job.payload.cancelled = future.done
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({future, gone}, timeout=self.config.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if future in done:
            try:
                return future.result()
            except AdapterError as err:
                raise HTTPException(422, str(err)) from None
        future.cancel()  # not started: never runs; generating: stops at the next token
        self.batcher.prune()  # its place in the queue (and the queue-depth gauge) is freed now
        if gone in done:
            raise HTTPException(499, "The client closed the connection.")
        raise HTTPException(504, f"No answer within {self.config.timeout:g} s (the server is loaded); retry or send "
                                 "fewer texts.")


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, *, registry: Optional[Registry] = None, hot_load: bool = True) -> "_Observed":
    """The ASGI app serving ``engine``'s model and adapters (for ``uvicorn.run``); the FastAPI
    app inside is its ``.app``. ``registry``: the adapters requests may name (default: those in
    the model); ``hot_load=False``: ``POST`` / ``DELETE /v1/adapters`` answer 403 (under Ray,
    where the configuration's adapters are the catalogue of every replica)."""
    server = _Server(engine, registry)
    config = engine.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.executor = ThreadPoolExecutor(1, thread_name_prefix="adapterkit-model")
        server.batcher = Batcher(engine.run, server.executor, window=config.batch_window, max_batch=config.max_batch,
                                 max_batch_tokens=config.max_batch_tokens, queue_size=config.queue_size,
                                 metrics=server.metrics)
        server.batcher.start()
        openai.start()
        yield
        await openai.stop()
        await server.batcher.stop()
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="adapterkit", version=__version__, lifespan=lifespan,
                  description="One frozen base model, many adapters, mixed batches.",
                  responses={"4XX": {"model": Error, "description": "a client error, named in detail"},
                             "5XX": {"model": Error, "description": "a server error"}})
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if is_openai_path(request.url.path):  # OpenAI's error object (openai_api.py)
            return validation_error(request, exc)
        errors = printable(jsonable_encoder(exc.errors(), custom_encoder={Exception: str}))
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "The body is not valid JSON; send a JSON object.", "errors": errors}, 400)
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if is_openai_path(request.url.path) and exc.status_code != 405:
            return http_error(request, exc)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only those of the first route matched
            methods = {m for r in app.routes if getattr(r, "methods", None) and r.path_regex.match(request.url.path)
                       for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=headers)

    @app.exception_handler(RecursionError)
    async def _deep(request: Request, exc: RecursionError):  # json.loads of a body like [[[[...]]]]
        message = "The body is nested too deeply to be a request; send a flat JSON object."
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(400, message), 400)
        return JSONResponse({"detail": message}, 400)

    @app.exception_handler(AdapterError)
    async def _refused(request: Request, exc: AdapterError):
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(400, printable(str(exc))), 400)
        return JSONResponse({"detail": str(exc)}, 422)

    @app.post("/v1/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(body: ClassifyRequest, request: Request) -> Any:
        _check_texts(body.texts, config.max_texts, config.max_chars)
        _check_texts(body.text_pairs or [], config.max_texts, config.max_chars)
        if body.text_pairs is not None and len(body.text_pairs) != len(body.texts):
            raise HTTPException(422, f"text_pairs has {len(body.text_pairs)} entries for {len(body.texts)} texts; "
                                     "send one second text per text.")
        described = await server.acquire(body.adapter)
        try:
            if described.get("head") is None:
                raise HTTPException(422, f"Adapter '{body.adapter}' has no head, so it cannot classify; use an "
                                         "adapter saved with its head (GET /v1/adapters shows heads).")
            examples = engine.encode_texts(body.texts, body.text_pairs)
            key = ClassifyKey(None if config.mixed_batches else body.adapter)
            job = Job(key, len(examples), max(e.length for e in examples),
                      ClassifyJob(body.adapter, examples))
            results = await server.run(request, job)
        finally:
            await server.release(body.adapter)
        return {"adapter": body.adapter, "head": described["head"]["type"], "results": results}

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> Any:
        if not engine.causal_lm:
            raise HTTPException(422, f"The base model '{config.model}' is not a causal LM; /v1/generate needs one "
                                     "(use /v1/classify).")
        if body.max_new_tokens > config.max_new_tokens:
            raise HTTPException(422, f"max_new_tokens={body.max_new_tokens} is over this server's limit of "
                                     f"{config.max_new_tokens}.")
        _check_texts([body.prompt], 1, config.max_chars)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        await server.acquire(body.adapter)
        try:
            prompt = engine.encode_prompt(body.prompt)
            if not prompt.length:
                raise HTTPException(422, "The prompt has no tokens; send some text.")
            if prompt.length > engine.max_length:
                raise HTTPException(413, f"The prompt has {prompt.length} tokens; this server takes {engine.max_length} "
                                         "at most (cutting it would lose its end): shorten the prompt.")
            if engine.positions is not None and prompt.length + body.max_new_tokens > engine.positions:
                raise HTTPException(413, f"The prompt's {prompt.length} tokens and max_new_tokens="
                                         f"{body.max_new_tokens} are more than the model's {engine.positions} "
                                         "positions: shorten the prompt or ask for fewer tokens.")
            key = GenerateKey(body.max_new_tokens, body.temperature)
            result = await server.run(request, Job(key, 1, prompt.length + body.max_new_tokens,
                                                   GenerateJob(body.adapter, prompt, stop)))
        finally:
            await server.release(body.adapter)
        return {"adapter": body.adapter, **result}

    @app.get("/v1/adapters", response_model=list[AdapterInfo])
    async def adapters() -> Any:
        return server.registry.describe()

    @app.post("/v1/adapters", response_model=AdapterInfo, status_code=201)
    async def load(body: LoadRequest, authorization: Optional[str] = Header(None)) -> Any:
        _check_hot_load(hot_load)
        check_admin(authorization, config.admin_token)
        name = check_name(body.name)
        remote = source_location(body.path, config)  # under an --adapter-source: fetched off the worker thread
        if remote:
            try:
                path = await asyncio.to_thread(local_folder, remote)
            except Exception as err:  # the location's fault (missing, damaged, unreachable); never a 500
                raise HTTPException(422, f"Cannot load '{body.path}': {one_line(err)}") from None
        else:
            path = check_path(body.path, config.allowed_roots)
        server.registry.reserve(name)  # a second load under this name now answers 409
        try:
            described = await server.on_worker(engine.load, name, str(path))
        except Exception as err:  # the folder's fault (the model is left as it was); never a 500
            server.registry.unreserve(name)
            raise HTTPException(422, f"Cannot load '{body.path}': {one_line(err)}") from None
        server.registry.add(name, described)
        server.metrics.adapters_loaded.set(len(server.registry))
        return {"name": name, **described}

    @app.delete("/v1/adapters/{name}", status_code=204)
    async def unload(name: str = Path(pattern=NAME_PATTERN), authorization: Optional[str] = Header(None)) -> Response:
        _check_hot_load(hot_load)
        check_admin(authorization, config.admin_token)
        check_name(name)
        if server.registry.hide(name):
            await server.remove(name)
        server.metrics.adapters_loaded.set(len(server.registry))
        return Response(status_code=204)

    @app.get("/health", response_model=Health)
    async def health() -> Any:
        queue = server.batcher.depth if server.batcher is not None else 0
        return {"status": "ok", "model": config.model, "adapters": len(server.registry), "queue": queue}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    openai = install(app, server, hot_load=hot_load)  # /v1/completions, /v1/chat/completions, /v1/models, ...
    return _Observed(BodyLimit(app, config.max_body_bytes), server.metrics, app)


def _check_hot_load(allowed: bool) -> None:
    if not allowed:
        raise HTTPException(403, "Loading and unloading over HTTP is off under Ray Serve (every replica serves the "
                                 "configuration's adapters): add or remove --adapter NAME=DIR and redeploy.")


def _check_texts(texts: list[str], max_texts: int, max_chars: int) -> None:
    if len(texts) > max_texts:
        raise HTTPException(413, f"{len(texts)} texts in one request; this server takes {max_texts} at most: split "
                                 "the request.")
    longest = max((len(t) for t in texts), default=0)
    if longest > max_chars:
        raise HTTPException(413, f"A text of {longest} characters; this server takes {max_chars} at most.")


class _Observed:
    """ASGI middleware: counts every HTTP answer (endpoint, status) and its latency. The endpoint
    is the route's path, also for answers given before routing (a body over the limit: 413); a
    request whose client left before its answer began counts as 499, whatever the app made of
    the missing body. Exposes the FastAPI app as ``.app`` (``openapi()``, ``state``)."""

    def __init__(self, inner, metrics: Metrics, fastapi_app: FastAPI):
        self.inner, self.metrics, self.app = inner, metrics, fastapi_app

    def endpoint(self, scope) -> str:
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.app.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", "other")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        start, status, started, left = time.perf_counter(), 500, False, False

        async def receiving():
            nonlocal left
            message = await receive()
            if message["type"] == "http.disconnect" and not started:
                left = True
            return message

        async def sending(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.inner(scope, receiving, sending)
        finally:
            self.metrics.observe(self.endpoint(scope), 499 if left else status, time.perf_counter() - start)
