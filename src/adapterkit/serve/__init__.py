"""``adapterkit serve``: one frozen base model, many adapters, mixed batches over HTTP.

* ``config``: the settings (``ServeConfig``), from flags or a JSON / TOML file;
* ``registry``: the loaded adapters, hot load and unload that wait for requests in flight;
* ``engine``: the model work (tokenising, classify and generate batches, reading heads);
* ``batcher``: dynamic batching (window, maximum batch, token budget, bounded queue);
* ``security``: the admin token, allowed roots and adapter names;
* ``metrics``: Prometheus metrics;
* ``app``: the FastAPI app and its request / response schemas.

Needs the ``serve`` extra: ``pip install adapterkit[serve]``.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
