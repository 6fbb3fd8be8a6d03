"""The server's settings: one frozen dataclass, filled from ``adapterkit serve`` flags or from a
JSON / TOML file with the same keys (flags given on the command line win)."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import AdapterError
from ..typecheck import check_field_types

ADMIN_TOKEN_ENV = "ADAPTERKIT_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``adapterkit serve`` needs; times in seconds, sizes in items / characters / tokens."""

    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> folder, loaded at start
    host: str = "127.0.0.1"
    port: int = 8080
    batch_window: float = 0.005  # how long the first request of a batch waits for company
    max_batch: int = 32  # examples per forward pass
    max_batch_tokens: int = 8192  # examples x padded length per forward pass
    queue_size: int = 256  # requests waiting; one more answers 429
    timeout: float = 30.0  # per request, queueing included; then 504
    admin_token: Optional[str] = None  # None (or empty / blank): the admin endpoints are off
    allowed_roots: tuple[str, ...] = ()  # POST /v1/adapters loads only from under these
    max_texts: int = 64  # texts per request (more: 413)
    max_chars: int = 10_000  # characters per text (more: 413)
    max_length: Optional[int] = None  # tokens per text after truncation; None: 512, or the model's positions if fewer
    max_new_tokens: int = 256  # generate's upper bound (more: 422)
    max_body_bytes: int = 1_000_000  # request body (more: 413)
    max_running_rows: int = 64  # rows the continuous-batching decode loop runs at once (OpenAI endpoints)
    max_running_tokens: int = 65_536  # rows x cache width in the decode loop's batch
    mixed_batches: bool = True  # False: a classify batch holds one adapter's requests (the baseline of the bench)
    ray: bool = False  # run as a Ray Serve application (ray_deployment.py)
    ray_address: Optional[str] = None  # the Ray cluster ("auto", "HOST:6379"); None: RAY_ADDRESS or a local one
    replicas: int = 1  # Ray Serve model replicas
    max_num_models_per_replica: int = 8  # adapters a replica holds at once (Ray's multiplexing; LRU eviction)
    replica_cpus: float = 1.0  # CPUs Ray reserves for each replica
    adapter_sources: tuple[str, ...] = ()  # locations whose adapters load on first use (on_demand.py)
    max_loaded_adapters: int = 8  # adapters loaded from adapter_sources kept at once (LRU eviction)
    torch_threads: int = 0  # intra-op threads of the forward; 0: cores - 1 (one is left for HTTP), under Ray replica_cpus
    read_timeout: float = 10.0  # seconds a client has to send a whole request (headers and body); then closed
    max_connections: int = 0  # open connections; 0: from the descriptor limit (RLIMIT_NOFILE - 64, at most 1000)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", dict(self.adapters))
        object.__setattr__(self, "allowed_roots", tuple(str(r) for r in self.allowed_roots))
        object.__setattr__(self, "adapter_sources", tuple(str(r) for r in self.adapter_sources))
        if isinstance(self.admin_token, str):  # an empty token is no token (as ADAPTERKIT_ADMIN_TOKEN=""); the
            object.__setattr__(self, "admin_token", self.admin_token.strip() or None)  # header's value is stripped too
        try:
            check_field_types(self)
        except TypeError as err:
            raise AdapterError(f"Invalid serve setting: {err}.") from None
        for name in ("max_batch", "max_batch_tokens", "queue_size", "max_texts", "max_chars", "max_length",
                     "max_new_tokens", "max_body_bytes", "max_running_rows", "max_running_tokens", "replicas",
                     "max_num_models_per_replica", "max_loaded_adapters"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AdapterError(f"serve setting {name} must be >= 1, got {getattr(self, name)}.")
        if self.replica_cpus < 0:
            raise AdapterError(f"serve setting replica_cpus must be >= 0, got {self.replica_cpus}.")
        if self.torch_threads < 0:
            raise AdapterError(f"serve setting torch_threads must be >= 0 (0: cores - 1), got {self.torch_threads}.")
        if self.batch_window < 0 or self.timeout <= 0 or not self.read_timeout > 0:
            raise AdapterError("serve settings: batch_window must be >= 0, timeout and read_timeout > 0 (seconds).")
        if self.max_connections < 0:
            raise AdapterError(f"serve setting max_connections must be >= 0 (0: from the descriptor limit), got "
                               f"{self.max_connections}.")

    @property
    def threads(self) -> int:
        """The forward's intra-op threads: ``torch_threads``, or one fewer than the cores (at least
        1), or under Ray the CPUs a replica reserves (its share of the node)."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, int(self.replica_cpus)) if self.ray else max(1, (os.cpu_count() or 2) - 1)

    def with_token_from_env(self) -> "ServeConfig":
        """The admin token from ``ADAPTERKIT_ADMIN_TOKEN`` when none was given."""
        if self.admin_token is None and os.environ.get(ADMIN_TOKEN_ENV, "").strip():
            return dataclasses.replace(self, admin_token=os.environ[ADMIN_TOKEN_ENV])
        return self

    @classmethod
    def from_file(cls, path: "str | os.PathLike", **overrides: Any) -> "ServeConfig":
        """Read a ``.json`` or ``.toml`` file of these keys; ``overrides`` (e.g. flags) win."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as err:
            raise AdapterError(f"{path}: cannot read the serve config ({err}); pass a JSON or .toml file.") from None
        if not isinstance(data, dict):
            raise AdapterError(f"{path}: the serve config must be an object of settings.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterError(f"{path}: unknown serve settings {unknown}; known: {sorted(known)}.")
        merged = {**data, **overrides}
        if "adapters" in data and "adapters" in overrides:
            merged["adapters"] = {**data["adapters"], **overrides["adapters"]}
        if "model" not in merged:
            raise AdapterError(f"{path}: no 'model'; give the base model folder or alias in the file or by --model.")
        return cls(**merged)
