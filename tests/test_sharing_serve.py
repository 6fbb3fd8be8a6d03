"""``serve --adapter-source``: adapters published to the S3 server (moto, 127.0.0.1) load on the
first request that names them, at most ``--max-loaded-adapters`` at once (LRU eviction); every
answer equals the adapter loaded locally, and refusals are 4xx with the reason."""

from __future__ import annotations

import json
import os
import random
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from serve_helpers import Running, save_base
from sharing_helpers import s3_server

from adapterkit import AdapterModel
from adapterkit.loader import load_tokenizer
from adapterkit.serve.config import ServeConfig
from adapterkit.sharing import push

N_ADAPTERS, N_REQUESTS, MAX_LOADED = 50, 200, 8
TEXTS = ["a fine film", "dull and long", "the actors shine", "not worth it"]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharing-serve")
    os.environ["ADAPTERKIT_CACHE"] = str(root / "cache")
    base = save_base(root / "bert", transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522),
        transformers.BertModel)
    model = AdapterModel.from_pretrained(str(base))
    torch.manual_seed(3)
    for i in range(N_ADAPTERS):
        name = f"a{i}"
        model.add_adapter(name, "lora", r=2)
        model.add_classification_head(name, 2, id2label={0: "neg", 1: "pos"})
        for p in list(model.adapters[name].parameters()) + list(model.heads[name].parameters()):
            torch.nn.init.normal_(p, std=0.5)
        model.save_adapter(root / "adapters" / name, name)
    model.eval()
    tokenizer = load_tokenizer(str(base))
    expected = {}
    with torch.no_grad():
        for i in range(N_ADAPTERS):
            for text in TEXTS:
                logits = model(**tokenizer([text], return_tensors="pt"), adapter_names=[f"a{i}"], routed_heads=True).logits
                expected[f"a{i}", text] = torch.softmax(logits[0].float(), -1).tolist()
    with s3_server():
        for i in range(N_ADAPTERS):
            push(root / "adapters" / f"a{i}", f"s3://adapters/pool/a{i}")
        yield root, base, expected
    os.environ.pop("ADAPTERKIT_CACHE", None)


def test_200_requests_over_50_adapters_load_on_first_use_with_lru_eviction(published):
    _root, base, expected = published
    config = ServeConfig(model=str(base), adapter_sources=("s3://adapters/pool",), max_loaded_adapters=MAX_LOADED,
                         torch_threads=1)
    rng = random.Random(0)
    plan = [(f"a{rng.randrange(N_ADAPTERS)}", rng.choice(TEXTS)) for _ in range(N_REQUESTS)]
    with Running(config) as server:
        url = f"{server.url}/v1/classify"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: post(url, {"adapter": job[0], "texts": [job[1]]}), plan))
        assert [status for status, _ in answers] == [200] * N_REQUESTS, [a for a in answers if a[0] != 200][:3]
        for (name, text), (_, body) in zip(plan, answers):
            got = body["results"][0]["probabilities"]
            assert [got["neg"], got["pos"]] == pytest.approx(expected[name, text], abs=1e-5)
        used = len({name for name, _ in plan})
        loads, evictions = metric(server.url, "adapterkit_adapter_loads_total"), \
            metric(server.url, "adapterkit_adapter_evictions_total")
        assert used <= loads and evictions == loads - len(server.app.app.state.server.on_demand.lru)
        assert evictions >= used - MAX_LOADED
        assert len(server.app.app.state.server.registry) <= MAX_LOADED
        assert metric(server.url, "adapterkit_adapter_cache_hits_total") == loads - used  # reloads come from the cache
        status, body = post(url, {"adapter": "nope", "texts": ["x"]})
        assert status == 404 and "adapter sources" in body["detail"]


def test_refusals_answer_4xx_with_the_reason(published, tmp_path, monkeypatch):
    _root, base, _ = published
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))  # the good copy of a1 is not cached here
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    manifest = json.loads(fs.cat_file("adapters/pool/a1/adapterkit_manifest.json"))
    fs.copy("adapters/pool/a1/adapterkit_manifest.json", "adapters/bad/a1/adapterkit_manifest.json")
    for name, entry in manifest["files"].items():
        data = bytearray(fs.cat_file(f"adapters/pool/a1/.adapterkit/blobs/{entry['sha256']}"))
        if name == "adapter_model.safetensors":
            data[-1] ^= 1
        fs.pipe_file(f"adapters/bad/a1/.adapterkit/blobs/{entry['sha256']}", bytes(data))
    other = save_base(tmp_path / "other", transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522,
        initializer_range=0.5), transformers.BertModel)
    with Running(ServeConfig(model=str(base), adapter_sources=("s3://adapters/bad",), torch_threads=1)) as server:
        status, body = post(f"{server.url}/v1/classify", {"adapter": "a1", "texts": ["x"]})
        assert status == 422 and "adapter_model.safetensors" in body["detail"] and "SHA-256" in body["detail"]
    with Running(ServeConfig(model=str(other), adapter_sources=("s3://adapters/pool",), torch_threads=1)) as server:
        status, body = post(f"{server.url}/v1/classify", {"adapter": "a2", "texts": ["x"]})
        assert status == 422 and "base" in body["detail"]
        assert metric(server.url, 'adapterkit_adapter_load_failures_total') == 1


def test_serve_flags_reach_the_config():
    from adapterkit.cli import build_parser
    from adapterkit.serve.command import config_from_args

    args = build_parser().parse_args(["serve", "--model", "minilm", "--adapter-source", "s3://a/pool",
                                      "--adapter-source", "hf://org/adapters", "--max-loaded-adapters", "3"])
    config = config_from_args(args)
    assert config.adapter_sources == ("s3://a/pool", "hf://org/adapters") and config.max_loaded_adapters == 3
    with pytest.raises(Exception, match="max_loaded_adapters must be >= 1"):
        ServeConfig(model="minilm", max_loaded_adapters=0)


def test_load_endpoint_takes_a_location_under_a_source(published, tmp_path, monkeypatch):
    _root, base, expected = published
    monkeypatch.setenv("ADAPTERKIT_CACHE", str(tmp_path / "cache"))
    config = ServeConfig(model=str(base), adapter_sources=("s3://adapters/pool",), admin_token="secret",
                         torch_threads=1)

    def load(server, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(f"{server.url}/v1/adapters", json.dumps(body).encode(),
                                         {"Content-Type": "application/json", "Authorization": "Bearer secret"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    with Running(config) as server:
        status, body = load(server, {"name": "mine", "path": "s3://adapters/pool/a5"})
        assert status == 201, body
        status, body = post(f"{server.url}/v1/classify", {"adapter": "mine", "texts": [TEXTS[0]]})
        got = body["results"][0]["probabilities"]
        assert status == 200 and [got["neg"], got["pos"]] == pytest.approx(expected["a5", TEXTS[0]], abs=1e-5)
        status, body = load(server, {"name": "other", "path": "s3://adapters/elsewhere/a5"})
        assert status == 403 and "--adapter-source" in body["detail"]
