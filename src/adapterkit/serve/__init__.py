"""``adapterkit serve``: one frozen base model, many adapters, mixed batches over HTTP.

* ``config``: the settings (``ServeConfig``), from flags or a JSON / TOML file;
* ``registry``: the loaded adapters, hot load and unload that wait for requests in flight;
* ``engine``: the model work (tokenising, classify and generate batches, reading heads);
* ``batcher``: dynamic batching (window, maximum batch, token budget, bounded queue);
* ``security``: the admin token, allowed roots and adapter names;
* ``metrics``: Prometheus metrics;
* ``app``: the FastAPI app and its request / response schemas;
* ``ray_deployment``: the same app as a Ray Serve application (``serve --ray``): replicas, and
  requests routed to replicas holding their adapter (Ray's model multiplexing).

Needs the ``serve`` extra: ``pip install adapterkit[serve]`` (``adapterkit[ray]`` for Ray Serve).
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
