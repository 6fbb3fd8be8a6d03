"""``adapterkit serve``: a real server on 127.0.0.1, spoken to over HTTP with httpx."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
import threading

import httpx
import pytest
import torch

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError
from adapterkit.loader import load_tokenizer
from adapterkit.serve.config import ServeConfig
from adapterkit.serve.registry import Registry

from serve_helpers import Running, make_decoder, make_encoder

TOKEN = "s3cret"
TEXTS = ["a fine film", "dull and far too long, with nothing in it", "Paris is in France", "ok"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(encoder):
    base, dirs = encoder
    adapters = {n: str(dirs[n]) for n in ("sent", "topic", "ner", "score", "nohead")}
    config = ServeConfig(model=str(base), adapters=adapters, batch_window=0.05, admin_token=TOKEN,
                         allowed_roots=(str(dirs["extra"].parent),), max_texts=8, max_chars=200, max_body_bytes=20_000)
    with Running(config) as running:
        yield running


def _expected(base, dirs, name: str, text: str) -> torch.Tensor:
    """The library, one example alone with its adapter and head."""
    model = _expected.models.get(str(base))
    if model is None:
        model = _expected.models[str(base)] = AdapterModel.from_pretrained(str(base)).eval()
    if name not in model.adapters:
        model.load_adapter(dirs[name], load_as=name)
    model.set_active_adapters(name)
    batch = load_tokenizer(str(base))(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, head=name).logits[0]


_expected.models = {}


def test_classify_mixed_adapters_equal_the_library(server, encoder):
    base, dirs = encoder
    requests = [(name, [text]) for text in TEXTS for name in ("sent", "topic", "ner", "score")]

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*[client.post("/v1/classify", json={"adapter": n, "texts": t})
                                          for n, t in requests])

    answers = asyncio.run(fire())
    assert [a.status_code for a in answers] == [200] * len(requests)
    for (name, [text]), answer in zip(requests, answers):
        body = answer.json()
        result = body["results"][0]
        logits = _expected(base, dirs, name, text)
        if name == "sent":
            probs = torch.softmax(logits, -1)
            assert body["head"] == "classification" and set(result["probabilities"]) == {"negative", "positive"}
            assert result["label"] == ["negative", "positive"][int(probs.argmax())]
            assert result["probabilities"]["positive"] == pytest.approx(probs[1].item(), abs=1e-4)
        elif name == "topic":
            assert list(result["probabilities"]) == [f"LABEL_{i}" for i in range(4)]
            assert list(result["probabilities"].values()) == pytest.approx(torch.softmax(logits, -1).tolist(), abs=1e-4)
        elif name == "score":
            assert result["values"] == pytest.approx(logits.tolist(), abs=1e-4)
        else:  # tagging: one tag per word, the word's first token decides
            assert result["tokens"] == text.replace(",", " ,").split()
            assert len(result["tags"]) == len(result["tokens"]) and set(result["tags"]) <= {"O", "PER", "LOC"}
            assert result["tags"][0] == ["O", "PER", "LOC"][int(logits[1].argmax())]  # token 0 is [CLS]
    metrics = httpx.get(server.url + "/metrics").text
    count = float(next(l for l in metrics.splitlines() if l.startswith('adapterkit_batch_size_count{kind="classify"}'))
                  .split()[-1])
    assert count < len(requests)  # requests shared forward passes


def test_pairs_and_several_texts(server):
    answer = httpx.post(server.url + "/v1/classify", json={"adapter": "sent", "texts": ["a", "b"],
                                                           "text_pairs": ["c", "d"]})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 2


@pytest.mark.parametrize("kwargs, status, words", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"json": {"adapter": "nope", "texts": ["x"]}}, 404, "No adapter named 'nope'"),
    ({"json": {"adapter": "nohead", "texts": ["x"]}}, 422, "has no head"),
    ({"json": {"adapter": "sent", "texts": ["x"] * 9}}, 413, "9 texts"),
    ({"json": {"adapter": "sent", "texts": ["x" * 201]}}, 413, "201 characters"),
    ({"json": {"adapter": "sent", "texts": ["x"] * 8, "pad": "y" * 30_000}}, 413, "over 20000 bytes"),
    ({"json": {"adapter": "sent", "texts": []}}, 422, "at least 1"),
    ({"json": {"adapter": "sent", "texts": ["x"], "text_pairs": []}}, 422, "text_pairs has 0"),
    ({"json": {"adapter": "sent", "texts": "x", "extra": 1}}, 422, "extra"),
    ({"json": ["a", "list"]}, 422, "object"),
])
def test_bad_classify_requests_get_4xx(server, kwargs, status, words):
    answer = httpx.post(server.url + "/v1/classify", **kwargs)
    assert answer.status_code == status, answer.text
    assert words.lower() in answer.text.lower()


def test_generate_refused_on_an_encoder(server):
    answer = httpx.post(server.url + "/v1/generate", json={"prompt": "hi"})
    assert answer.status_code == 422 and "not a causal LM" in answer.text


def test_admin_endpoints_need_the_token_and_allowed_roots(server, encoder, tmp_path):
    _, dirs = encoder
    url, good = server.url + "/v1/adapters", {"Authorization": f"Bearer {TOKEN}"}
    body = {"name": "extra", "path": str(dirs["extra"])}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.delete(url + "/sent").status_code == 401
    outside = httpx.post(url, json={"name": "x", "path": str(dirs["sent"])}, headers=good)  # another folder
    assert outside.status_code == 403 and "outside the allowed roots" in outside.text
    sneaky = httpx.post(url, json={"name": "x", "path": str(dirs["extra"]) + "/../../adapters/sent"},
                        headers=good)
    assert sneaky.status_code == 403
    assert httpx.post(url, json={"name": "a/b", "path": str(dirs["extra"])}, headers=good).status_code == 422
    (dirs["extra"].parent / "junk").mkdir(exist_ok=True)
    junk = httpx.post(url, json={"name": "junk", "path": str(dirs["extra"].parent / "junk")}, headers=good)
    assert junk.status_code == 422 and "Cannot load" in junk.text
    loaded = httpx.post(url, json=body, headers=good)
    assert loaded.status_code == 201, loaded.text
    assert loaded.json()["head"] == {"type": "classification", "num_labels": 3, "multilabel": True,
                                     "labels": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    assert httpx.post(url, json=body, headers=good).status_code == 409
    assert "extra" in [a["name"] for a in httpx.get(url).json()]
    answer = httpx.post(server.url + "/v1/classify", json={"adapter": "extra", "texts": ["x"]})
    assert answer.status_code == 200 and set(answer.json()["results"][0]) == {"labels", "probabilities"}
    assert httpx.delete(url + "/extra", headers=good).status_code == 204
    assert httpx.post(server.url + "/v1/classify", json={"adapter": "extra", "texts": ["x"]}).status_code == 404
    assert httpx.delete(url + "/extra", headers=good).status_code == 404
    assert "extra" not in server.app.app.state.server.engine.model.adapters


def test_hot_load_and_unload_during_traffic(server, encoder):
    base, dirs = encoder
    want = torch.softmax(_expected(base, dirs, "sent", "steady traffic"), -1)[1].item()
    answers, stop = [], threading.Event()

    def traffic():
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                answers.append(client.post("/v1/classify", json={"adapter": "sent", "texts": ["steady traffic"]}))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    good = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for round_ in range(3):
            loaded = httpx.post(server.url + "/v1/adapters", json={"name": f"hot{round_}", "path": str(dirs["extra"])},
                                headers=good, timeout=30)
            assert loaded.status_code == 201, loaded.text
            assert httpx.post(server.url + "/v1/classify", json={"adapter": f"hot{round_}", "texts": ["x"]},
                              timeout=30).status_code == 200
            assert httpx.delete(server.url + f"/v1/adapters/hot{round_}", headers=good, timeout=30).status_code == 204
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert answers and all(a.status_code == 200 for a in answers)
    assert all(a.json()["results"][0]["probabilities"]["positive"] == pytest.approx(want, abs=1e-4) for a in answers)


def test_unload_waits_for_requests_holding_the_adapter():
    registry = Registry()
    registry.add("a", {"method": "lora", "head": None})
    registry.acquire("a")
    assert registry.hide("a") is False  # a request holds it: stays in the model
    with pytest.raises(Exception, match="No adapter named 'a'"):
        registry.acquire("a")
    with pytest.raises(Exception, match="still finishing"):
        registry.reserve("a")
    assert registry.release("a") is True  # the last hold: remove it now
    registry.gone("a")
    registry.reserve("a")


def test_health_metrics_openapi(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["adapters"] >= 5
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("adapterkit_requests_total", "adapterkit_request_errors_total", "adapterkit_batch_size",
                 "adapterkit_queue_depth", "adapterkit_request_latency_seconds", "adapterkit_adapters_loaded"):
        assert name in metrics
    assert 'endpoint="/v1/classify"' in metrics
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/health"} <= set(paths)


def test_full_queue_answers_429_and_timeouts_504(encoder):
    base, dirs = encoder
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, batch_window=0.5, queue_size=1,
                         max_batch=1)
    with Running(config) as running:
        async def fire():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                return await asyncio.gather(*[client.post("/v1/classify", json={"adapter": "sent", "texts": ["x"]})
                                              for _ in range(6)])

        codes = sorted(a.status_code for a in asyncio.run(fire()))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, batch_window=1.0, timeout=0.1)
    with Running(config) as running:
        answer = httpx.post(running.url + "/v1/classify", json={"adapter": "sent", "texts": ["x"]})
        assert answer.status_code == 504 and "within 0.1 s" in answer.text
        import time
        time.sleep(1.2)  # past the window: the timed-out job must have been dropped, not run
        metrics = httpx.get(running.url + "/metrics").text
        assert 'kind="classify"' not in metrics  # no batch ever ran


def test_a_client_that_leaves_costs_no_work(encoder):
    import time

    base, dirs = encoder
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, batch_window=1.0)
    with Running(config) as running:
        with pytest.raises(httpx.ReadTimeout):  # the client leaves while its request waits for the window
            httpx.post(running.url + "/v1/classify", json={"adapter": "sent", "texts": ["x"]}, timeout=0.2)
        time.sleep(1.2)
        metrics = httpx.get(running.url + "/metrics").text
        assert 'kind="classify"' not in metrics  # its job was dropped: it cost no forward pass
        assert 'status="499"' in metrics


def test_admin_off_without_a_token(encoder, monkeypatch):
    base, dirs = encoder
    monkeypatch.delenv("ADAPTERKIT_ADMIN_TOKEN", raising=False)
    with Running(ServeConfig(model=str(base), allowed_roots=(str(dirs["extra"].parent),))) as running:
        answer = httpx.post(running.url + "/v1/adapters", json={"name": "e", "path": str(dirs["extra"])},
                            headers={"Authorization": "Bearer anything"})
        assert answer.status_code == 403 and "admin endpoints are off" in answer.text


def test_generate_equals_the_library(tmp_path):
    base, dirs = make_decoder(tmp_path)
    config = ServeConfig(model=str(base), adapters={"poet": str(dirs["poet"])}, max_new_tokens=8)
    model = AdapterModel.from_pretrained(str(base)).eval()
    model.load_adapter(dirs["poet"], set_active=True)
    tokenizer = load_tokenizer(str(base))
    ids = tokenizer("the sea", add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    with Running(config) as running:
        async def fire():
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                return await asyncio.gather(
                    client.post("/v1/generate", json={"prompt": "the sea", "adapter": "poet", "max_new_tokens": 6}),
                    client.post("/v1/generate", json={"prompt": "a longer prompt here", "max_new_tokens": 6}))

        poet, bare = asyncio.run(fire())
        assert poet.status_code == 200 and bare.status_code == 200, (poet.text, bare.text)
        assert poet.json()["text"] == expected and poet.json()["adapter"] == "poet"
        if expected.strip():
            stop = expected.split()[-1]
            cut = httpx.post(running.url + "/v1/generate", json={"prompt": "the sea", "adapter": "poet",
                                                                 "max_new_tokens": 6, "stop": stop}).json()
            assert cut["text"] == expected[:expected.find(stop)] and cut["finish_reason"] == "stop"
        over = httpx.post(running.url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 9})
        assert over.status_code == 422 and "limit of 8" in over.text
        bad = httpx.post(running.url + "/v1/generate", json={"prompt": "x", "temperature": -1})
        assert bad.status_code == 422


def test_config_file_and_flags(tmp_path, monkeypatch):
    from adapterkit.cli import build_parser
    from adapterkit.serve.command import config_from_args

    (tmp_path / "s.toml").write_text('model = "m"\nport = 9000\nmax_batch = 4\n[adapters]\na = "/x"\n')
    (tmp_path / "s.json").write_text(json.dumps({"model": "m", "prot": 1}))
    monkeypatch.setenv("ADAPTERKIT_ADMIN_TOKEN", "env-token")
    args = build_parser().parse_args(["serve", "--config", str(tmp_path / "s.toml"), "--port", "9001",
                                      "--adapter", "b=/y"])
    config = config_from_args(args)
    assert (config.port, config.max_batch, config.adapters, config.admin_token) == \
        (9001, 4, {"a": "/x", "b": "/y"}, "env-token")
    with pytest.raises(AdapterError, match="unknown serve settings \\['prot'\\]"):
        config_from_args(build_parser().parse_args(["serve", "--config", str(tmp_path / "s.json")]))
    with pytest.raises(AdapterError, match="needs --model"):
        config_from_args(build_parser().parse_args(["serve"]))
    with pytest.raises(AdapterError, match="max_batch must be >= 1"):
        ServeConfig(model="m", max_batch=0)
    ray = config_from_args(build_parser().parse_args(
        ["serve", "--model", "m", "--ray", "--replicas", "3", "--max-num-models-per-replica", "2",
         "--ray-address", "auto", "--torch-threads", "1"]))
    assert (ray.ray, ray.replicas, ray.max_num_models_per_replica, ray.ray_address, ray.threads) == \
        (True, 3, 2, "auto", 1)
    assert ServeConfig(model="m").threads == max(1, (os.cpu_count() or 2) - 1)
    assert ServeConfig(model="m", ray=True, replica_cpus=2).threads == 2
    for bad, words in ({"replicas": 0}, "replicas must be >= 1"), ({"torch_threads": -1}, "torch_threads"):
        with pytest.raises(AdapterError, match=words):
            ServeConfig(model="m", **bad)


def test_the_serve_command_starts_a_server(encoder, tmp_path):
    """``adapterkit serve`` itself, as a process, with a config file and a flag."""
    import subprocess
    import sys
    import time

    from serve_helpers import free_port

    base, dirs = encoder
    port = free_port()
    (tmp_path / "serve.json").write_text(json.dumps({"model": str(base), "adapters": {"sent": str(dirs["sent"])}}))
    proc = subprocess.Popen([sys.executable, "-m", "adapterkit", "serve", "--config", str(tmp_path / "serve.json"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.2)
        assert health.json()["adapters"] == 1
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"adapter": "sent", "texts": ["fine"]})
        assert answer.json()["results"][0]["label"] in ("negative", "positive")
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_serve_command_refuses_bad_settings(capsys):
    from adapterkit.cli import main

    assert main(["serve"]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_batches_respect_keys_max_batch_and_token_budget():
    from concurrent.futures import ThreadPoolExecutor

    from adapterkit.serve.batcher import Batcher, Job
    from adapterkit.serve.engine import ClassifyKey

    async def scenario():
        batcher = Batcher(lambda key, payloads: payloads, ThreadPoolExecutor(1), window=0.0, max_batch=4,
                          max_batch_tokens=40, queue_size=10)
        mixed, only_a = ClassifyKey(), ClassifyKey("a")
        jobs = [Job(mixed, 2, 5, "m1"), Job(only_a, 1, 5, "a1"), Job(mixed, 1, 5, "m2"), Job(mixed, 2, 5, "m3"),
                Job(mixed, 1, 30, "long"), Job(only_a, 1, 5, "a2")]
        for job in jobs:
            batcher.submit(job)
        jobs[2].future.cancel()  # its client left: dropped
        return [[j.payload for j in batcher._take()] for _ in range(4)]

    assert asyncio.run(scenario()) == [["m1", "m3"], ["a1", "a2"], ["long"], []]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_schemathesis_finds_no_500_and_no_schema_violation(kind, encoder, tmp_path):
    """Every check of ``schemathesis`` against /openapi.json, but ``positive_data_acceptance``:
    some schema-valid requests are refused on purpose by what the schema cannot say (an adapter
    that is not loaded, ``text_pairs`` of another length, generate on an encoder: 404 / 422)."""
    import shutil
    import subprocess

    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if kind == "encoder":
        base, dirs = encoder
        adapters = {n: str(dirs[n]) for n in ("sent", "ner", "score", "nohead")}
        roots = (str(dirs["extra"].parent),)
    else:
        base, gen = make_decoder(tmp_path)
        adapters, roots = {"poet": str(gen["poet"])}, (str(tmp_path / "gen"),)
    config = ServeConfig(model=str(base), adapters=adapters, admin_token=TOKEN, allowed_roots=roots, max_texts=4,
                         max_chars=100, max_new_tokens=3)
    with Running(config) as running:
        done = subprocess.run([exe, "run", running.url + "/openapi.json", "--checks", "all", "--exclude-checks",
                               "positive_data_acceptance", "--max-examples", "15", "--seed", "1",
                               "-H", f"Authorization: Bearer {TOKEN}"], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)  # its cache stays out of the checkout
    assert done.returncode == 0, done.stdout[-4000:]


def test_generation_stops_when_every_client_has_gone(tmp_path):
    """A generate batch whose requests have all gone stops at the next token (no further work)."""
    from adapterkit.serve.engine import build_engine
    from adapterkit.serve.engine import GenerateJob, GenerateKey

    base, gen = make_decoder(tmp_path)
    engine = build_engine(ServeConfig(model=str(base), adapters={"poet": str(gen["poet"])}))
    prompt = engine.encode_prompt("the sea")
    eos = engine.model.model.generation_config.eos_token_id
    engine.model.model.generation_config.eos_token_id = None  # never ends early by itself
    try:
        key = GenerateKey(max_new_tokens=12, temperature=0.0)
        stayed = engine.generate(key, [GenerateJob("poet", prompt, []), GenerateJob(None, prompt, [])])
        left = engine.generate(key, [GenerateJob("poet", prompt, [], cancelled=lambda: True)])
    finally:
        engine.model.model.generation_config.eos_token_id = eos
    assert [r["tokens"] for r in stayed] == [12, 12]
    assert left[0]["tokens"] == 1


@pytest.mark.parametrize("pairs", [None, ["second text", "q"]])
def test_encoding_and_padding_equal_the_tokenizer(encoder, pairs):
    """The engine reads the fast tokenizer's backend and pads batches itself: the same ids, word
    ids, offsets and padded tensors as calling the tokenizer, whatever state a call left behind."""
    from adapterkit.serve.engine import Engine

    base, _ = encoder
    tokenizer = load_tokenizer(str(base))
    engine = Engine(AdapterModel.from_pretrained(str(base)), tokenizer, ServeConfig(model=str(base), max_length=8))
    texts = ["a fine, moving film that goes on and on", "Paris"]
    tokenizer(texts, padding="max_length", max_length=20)  # leaves padding on in the backend
    mine = engine.encode_texts(texts, pairs)
    theirs = tokenizer(texts, pairs, truncation=True, max_length=8, return_offsets_mapping=True)
    for i, example in enumerate(mine):
        assert example.features == {k: theirs[k][i] for k in theirs.keys() if k != "offset_mapping"}
        assert list(example.offsets) == [tuple(o) for o in theirs["offset_mapping"][i]]
        assert example.word_ids == [w if s == 0 else None for w, s in zip(theirs.word_ids(i), theirs.sequence_ids(i))]
    padded = engine._pad([e.features for e in mine], "right")
    reference = tokenizer.pad([e.features for e in mine], padding=True, return_tensors="pt")
    assert padded.keys() == reference.keys()
    for key in padded:
        assert torch.equal(padded[key], reference[key])
