"""``serve --ray`` without a shared file system: a 2-replica deployment whose base model and
adapters are locations on the S3 server (moto, 127.0.0.1) -- one given with ``--adapter``, the
others found under ``--adapter-source`` on first use; each replica fetches them into its cache,
Ray's multiplexing routes by adapter, and the answers equal the single-process server's on the
local folders."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'adapterkit[ray]')")

import httpx
import ray
from ray import serve
from serve_helpers import Running, free_port, make_encoder
from sharing_helpers import s3_server

from adapterkit.serve import ray_deployment
from adapterkit.serve.config import ServeConfig
from adapterkit.sharing import push

ADAPTERS = ("sent", "topic", "ner")
TEXTS = ["a fine film", "dull and far too long"]


def test_ray_replicas_load_base_and_adapters_from_the_object_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    base, dirs = make_encoder(tmp_path / "local")
    single = ServeConfig(model=str(base), adapters={n: str(dirs[n]) for n in ADAPTERS}, batch_window=0.0)
    with s3_server() as endpoint, Running(single) as running:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.put(str(base) + "/", "adapters/bases/bert/", recursive=True)  # a plain model folder, no manifest
        for name in ADAPTERS:
            push(dirs[name], f"s3://adapters/pool/{name}")
        shutil.rmtree(tmp_path / "local")  # nothing on the local disk: only the object store
        scaled = ServeConfig(model="s3://adapters/bases/bert", adapters={"sent": "s3://adapters/pool/sent"},
                             adapter_sources=("s3://adapters/pool",), batch_window=0.0, host="127.0.0.1", port=free_port(), ray=True, replicas=2,
                             max_num_models_per_replica=2, replica_cpus=0.5, torch_threads=1)
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == "ADAPTERKIT_CACHE"}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": env})
        try:
            url = ray_deployment.run(scaled, blocking=False)
            replicas = set()
            for round_ in range(3):
                for name in ADAPTERS:
                    body = {"adapter": name, "texts": TEXTS}
                    mine = httpx.post(url + "/v1/classify", json=body, timeout=120)
                    want = httpx.post(running.url + "/v1/classify", json=body, timeout=60).json()
                    assert mine.status_code == 200, mine.text
                    replicas.add(mine.headers["x-adapterkit-replica"])
                    for a, b in zip(mine.json()["results"], want["results"]):
                        for key in a:
                            assert a[key] == (pytest.approx(b[key], abs=1e-5) if key in ("probability", "values")
                                              else b[key])
            assert len(replicas) == 2  # both replicas fetched the base and adapters themselves
            missing = httpx.post(url + "/v1/classify", json={"adapter": "nope", "texts": ["x"]}, timeout=60)
            assert missing.status_code == 404 and "adapter sources" in missing.json()["detail"]
        finally:
            serve.shutdown()
            ray.shutdown()
