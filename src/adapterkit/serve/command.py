"""``adapterkit serve``: its flags, and starting the server (imports FastAPI only when it runs,
so the rest of the command line works without the ``serve`` extra)."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..errors import AdapterError
from .config import ServeConfig
from .engine import build_engine

#: flag -> (ServeConfig field, type, help)
_FLAGS = {
    "--host": ("host", str, "address to listen on (default 127.0.0.1)"),
    "--port": ("port", int, "port (default 8080)"),
    "--batch-window": ("batch_window", float, "seconds a request waits for others to batch with (default 0.005)"),
    "--max-batch": ("max_batch", int, "examples per forward pass (default 32)"),
    "--max-batch-tokens": ("max_batch_tokens", int, "examples x padded length per forward pass (default 8192)"),
    "--queue-size": ("queue_size", int, "requests waiting; one more answers 429 (default 256)"),
    "--timeout": ("timeout", float, "seconds per request, queueing included; then 504 (default 30)"),
    "--admin-token": ("admin_token", str, "bearer token for loading / unloading adapters (default: "
                                          "$ADAPTERKIT_ADMIN_TOKEN; none or empty: those endpoints are off)"),
    "--max-texts": ("max_texts", int, "texts per request (default 64; more: 413)"),
    "--max-chars": ("max_chars", int, "characters per text (default 10000; more: 413)"),
    "--max-length": ("max_length", int, "tokens per text after truncation, and per generate prompt (default 512, or "
                                        "the model's positions if fewer; more than the model's: refused at start)"),
    "--max-new-tokens": ("max_new_tokens", int, "generate's upper bound (default 256; more: 422)"),
    "--max-running-rows": ("max_running_rows", int, "rows the OpenAI endpoints' continuous batch decodes at once "
                                                     "(default 64)"),
    "--max-running-tokens": ("max_running_tokens", int, "rows x cache width of that batch (default 65536)"),
    "--ray-address": ("ray_address", str, "with --ray: the Ray cluster to join ('auto', or HEAD:6379; default: "
                                          "$RAY_ADDRESS, else a local cluster)"),
    "--replicas": ("replicas", int, "with --ray: model replicas (default 1)"),
    "--max-num-models-per-replica": ("max_num_models_per_replica", int, "with --ray: adapters one replica holds at "
                                                                        "once; the least recently used leaves (default 8)"),
    "--replica-cpus": ("replica_cpus", float, "with --ray: CPUs Ray reserves per replica (default 1)"),
    "--max-loaded-adapters": ("max_loaded_adapters", int, "adapters loaded from --adapter-source kept at once; the "
                                                          "least recently used idle one leaves (default 8)"),
    "--torch-threads": ("torch_threads", int, "intra-op threads of the forward (default 0: cores - 1, one core "
                                              "is left for HTTP; under --ray: the replica's CPUs)"),
    "--read-timeout": ("read_timeout", float, "seconds a client has to send a whole request, headers and body; "
                                              "then its connection is closed (default 10)"),
    "--max-connections": ("max_connections", int, "open connections at most; past it the oldest connection still "
                                                  "sending its request is closed (default: the descriptor limit "
                                                  "- 64, at most 1000)"),
}


def _named_dir(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got '{value}'")
    return name, path


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a base model with many adapters over HTTP (needs adapterkit[serve])",
                       description="One frozen base model, many adapters, mixed batches: POST /v1/classify, "
                                   "/v1/generate; GET/POST /v1/adapters, DELETE /v1/adapters/NAME; /health, /metrics; "
                                   "OpenAI's /v1/completions, /v1/chat/completions, /v1/models (streaming, "
                                   "continuous batching) and vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter.")
    p.add_argument("--model", help="base model folder or alias (minilm, smollm2)")
    p.add_argument("--adapter", dest="adapters", action="append", type=_named_dir, default=[], metavar="NAME=DIR",
                   help="an adapter to load at start (repeat for more)")
    p.add_argument("--config", help="a JSON or .toml file of the same settings (flags win)")
    p.add_argument("--allowed-root", dest="allowed_roots", action="append", default=[], metavar="DIR",
                   help="POST /v1/adapters may load from under this folder (repeat for more; default: none)")
    p.add_argument("--adapter-source", dest="adapter_sources", action="append", default=[], metavar="LOCATION",
                   help="load an adapter a request names from LOCATION/NAME on first use (a folder, s3://, http(s)://, "
                        "hf://; repeat for more, tried in order)")
    p.add_argument("--ray", action="store_true", default=None,
                   help="run as a Ray Serve application: replicas across a Ray cluster, requests routed to "
                        "replicas holding their adapter (needs adapterkit[ray])")
    for flag, (dest, typ, help_) in _FLAGS.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def config_from_args(args: argparse.Namespace):
    given: dict[str, Any] = {dest: getattr(args, dest) for dest, _, _ in _FLAGS.values()
                             if getattr(args, dest) is not None}
    if args.ray:
        given["ray"] = True
    if args.model:
        given["model"] = args.model
    if args.adapters:
        given["adapters"] = dict(args.adapters)
    if args.allowed_roots:
        given["allowed_roots"] = tuple(args.allowed_roots)
    if getattr(args, "adapter_sources", None):
        given["adapter_sources"] = tuple(args.adapter_sources)
    if args.config:
        return ServeConfig.from_file(args.config, **given).with_token_from_env()
    if "model" not in given:
        raise AdapterError("serve needs --model PATH_OR_ALIAS (or a --config file with 'model').")
    return ServeConfig(**given).with_token_from_env()


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: PLC0415 - optional dependency: the serve extra

        from .app import create_app  # noqa: PLC0415 - optional dependency: the serve extra (fastapi)
    except ImportError as err:
        raise AdapterError(f"serve needs the serve extra ({err.name} is missing): pip install 'adapterkit[serve]'.") \
            from None
    config = config_from_args(args)
    if config.ray:
        try:
            from . import ray_deployment  # noqa: PLC0415 - optional dependency: the ray extra
        except ImportError as err:
            raise AdapterError(f"serve --ray needs Ray Serve ({err.name} is missing): pip install "
                               "'adapterkit[ray]'.") from None
        ray_deployment.run(config)
        return 0

    from .connections import uvicorn_config  # noqa: PLC0415 - optional dependency: the serve extra (uvicorn)

    torch.set_num_threads(config.threads)  # the process's: a server owns its process
    app = create_app(build_engine(config))
    uvicorn.Server(uvicorn_config(app, config)).run()
    return 0
