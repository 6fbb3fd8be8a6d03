"""The server's defects (issue: security, 500s, silent or inconsistent answers), one test each,
against a real uvicorn on 127.0.0.1 with tiny models. Each of these failed before its fix."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from adapterkit import AdapterModel
from adapterkit.errors import AdapterError, CheckpointError
from adapterkit.checkpoint_format import read_meta
from adapterkit.serve.config import ServeConfig

from serve_helpers import Running, make_decoder, make_encoder

TOKEN = "s3cret"
GOOD = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("defects"))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return make_decoder(tmp_path_factory.mktemp("defects-dec"))


@pytest.fixture(scope="module")
def server(encoder):
    base, dirs = encoder
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"]), "ner": str(dirs["ner"])},
                         batch_window=0.02, admin_token=TOKEN, allowed_roots=(str(dirs["extra"].parent),),
                         max_body_bytes=20_000)
    with Running(config) as running:
        yield running


@pytest.fixture(scope="module")
def gen_server(decoder):
    base, dirs = decoder
    config = ServeConfig(model=str(base), adapters={"poet": str(dirs["poet"])}, max_length=16, max_new_tokens=8,
                         batch_window=0.02)
    with Running(config) as running:
        yield running


def _metric(url: str, prefix: str) -> float:
    lines = [l for l in httpx.get(url + "/metrics").text.splitlines() if l.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


# -- security ------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["", "   "])
def test_an_empty_admin_token_turns_admin_off(encoder, token, monkeypatch):
    base, dirs = encoder
    monkeypatch.delenv("ADAPTERKIT_ADMIN_TOKEN", raising=False)
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, admin_token=token,
                         allowed_roots=(str(dirs["extra"].parent),))
    assert config.admin_token is None
    with Running(config) as running:
        for header in ({"Authorization": "Bearer"}, {"Authorization": "bearer"}):
            gone = httpx.delete(running.url + "/v1/adapters/sent", headers=header)
            assert gone.status_code == 403 and "admin endpoints are off" in gone.text
            loaded = httpx.post(running.url + "/v1/adapters", json={"name": "e", "path": str(dirs["extra"])},
                                headers=header)
            assert loaded.status_code == 403
        assert [a["name"] for a in httpx.get(running.url + "/v1/adapters").json()] == ["sent"]
    monkeypatch.setenv("ADAPTERKIT_ADMIN_TOKEN", " ")
    assert ServeConfig(model="m").with_token_from_env().admin_token is None
    assert ServeConfig(model="m", admin_token=" t ").admin_token == "t"  # a header's value arrives stripped


def test_symlinked_files_inside_an_allowed_root_are_refused(server, encoder):
    _, dirs = encoder
    root = dirs["extra"].parent
    linked = root / "linked"
    shutil.rmtree(linked, ignore_errors=True)
    linked.mkdir()
    for f in dirs["sent"].iterdir():  # dirs["sent"] is outside the allowed root
        (linked / f.name).symlink_to(f)
    answer = httpx.post(server.url + "/v1/adapters", json={"name": "linked", "path": str(linked)}, headers=GOOD)
    assert answer.status_code == 403, answer.text
    assert "a link to a file outside the allowed roots" in answer.json()["detail"]
    assert "linked" not in [a["name"] for a in httpx.get(server.url + "/v1/adapters").json()]
    inside = root / "inside"  # links that stay under the root are fine
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir()
    for f in dirs["extra"].iterdir():
        (inside / f.name).symlink_to(f)
    ok = httpx.post(server.url + "/v1/adapters", json={"name": "inside", "path": str(inside)}, headers=GOOD)
    assert ok.status_code == 201, ok.text
    assert httpx.delete(server.url + "/v1/adapters/inside", headers=GOOD).status_code == 204


# -- 500s ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    b'{"adapter": "sent", "texts": ["\\ud800"]}',
    b'{"adapter": "sent", "texts": ["a\xed\xa0\x80b"]}',
    b'{"adapter": "sent", "texts": ["a"], "text_pairs": ["x\\udfff"]}',
])
def test_a_lone_surrogate_is_a_422_and_keeps_the_connection(server, body):
    with httpx.Client(base_url=server.url) as client:
        answer = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert "lone surrogate" in answer.text
        again = client.post("/v1/classify", json={"adapter": "sent", "texts": ["fine"]})
        assert again.status_code == 200
        assert answer.headers.get("connection") != "close"


def test_a_lone_surrogate_in_a_prompt_is_a_422(gen_server):
    answer = httpx.post(gen_server.url + "/v1/generate", content=b'{"prompt": "q\\ud83d"}',
                        headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "prompt"]
    for prompt in (b'"\\ud800 x"', b'"a\xed\xa0\x80b"'):
        answer = httpx.post(gen_server.url + "/v1/generate", content=b'{"prompt": ' + prompt + b'}',
                            headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text


@pytest.mark.parametrize("path, body", [
    ("/v1/adapters", b'{"name": NaN, "path": "x"}'),
    ("/v1/adapters", b'{"name": Infinity, "path": -Infinity}'),
    ("/v1/classify", b'{"adapter": "sent", "texts": [NaN]}'),
])
def test_nan_and_infinity_in_an_invalid_field_are_a_422(server, path, body):
    answer = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["input"] in ("NaN", "nan", "inf", "-inf", "Infinity")


@pytest.mark.parametrize("temperature", ["NaN", "Infinity", "1e-45", "1e-300"])
def test_bad_temperatures_are_a_422(gen_server, temperature):
    body = f'{{"prompt": "the sea", "temperature": {temperature}, "max_new_tokens": 2}}'.encode()
    answer = httpx.post(gen_server.url + "/v1/generate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text


def test_a_tiny_but_valid_temperature_samples_like_greedy(gen_server):
    greedy = httpx.post(gen_server.url + "/v1/generate", json={"prompt": "the sea", "max_new_tokens": 4})
    tiny = httpx.post(gen_server.url + "/v1/generate", json={"prompt": "the sea", "max_new_tokens": 4,
                                                            "temperature": 1e-5})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["text"] == greedy.json()["text"]


def test_max_length_over_the_model_is_refused_at_start(encoder):
    from adapterkit.loader import load_tokenizer
    from adapterkit.serve.engine import Engine

    base, _ = encoder
    model = AdapterModel.from_pretrained(str(base))
    with pytest.raises(AdapterError, match="--max-length 2048 is more than the model can take.*512"):
        Engine(model, load_tokenizer(str(base)), ServeConfig(model=str(base), max_length=2048))
    assert Engine(model, load_tokenizer(str(base)), ServeConfig(model=str(base))).max_length == 512


def test_max_length_over_the_model_fails_the_serve_command(encoder, capsys, monkeypatch):
    import uvicorn

    from adapterkit.cli import main

    base, _ = encoder
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # were it to start, return at once
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: None)
    assert main(["serve", "--model", str(base), "--max-length", "2048", "--port", "1"]) == 2
    assert "--max-length 2048 is more than" in capsys.readouterr().err


def test_one_failing_job_never_fails_the_others_in_its_batch():
    from adapterkit.serve.batcher import Batcher, Job

    def run(key, payloads):
        if "bad" in payloads:
            raise RuntimeError("boom")
        return [p.upper() for p in payloads]

    async def scenario():
        batcher = Batcher(run, ThreadPoolExecutor(1), window=0.05, max_batch=8, max_batch_tokens=1000, queue_size=10)
        batcher.start()
        futures = [batcher.submit(Job("k", 1, 1, p)) for p in ("a", "bad", "b", "c")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    a, bad, b, c = asyncio.run(scenario())
    assert (a, b, c) == ("A", "B", "C")
    assert isinstance(bad, RuntimeError)


def _bad_folder(src, root, name, edit) -> str:
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(src, target)
    meta = json.loads((target / "adapter_config.json").read_text())
    text = edit(meta)
    (target / "adapter_config.json").write_text(text if isinstance(text, str) else json.dumps(meta))
    return str(target)


MALFORMED = {
    "nested": lambda m: "[" * 100_000 + "]" * 100_000,
    "version_string": lambda m: m.update(format_version="1"),
    "version_list": lambda m: m.update(format_version=[2]),
    "base_list": lambda m: m.update(base_model=[1, 2]),
    "labels_float": lambda m: m["head"].update(num_labels=1e12),
    "labels_huge": lambda m: m["head"].update(num_labels=10 ** 12),
    "host_shapes": lambda m: m["base_model"].update(host_shapes=[1]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_adapter_folder_is_a_checkpoint_error_and_a_422(server, encoder, case):
    base, dirs = encoder
    folder = _bad_folder(dirs["extra"], dirs["extra"].parent, f"bad_{case}", MALFORMED[case])
    model = AdapterModel.from_pretrained(str(base))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        model.load_adapter(folder)
    with pytest.raises(CheckpointError, match="adapter_config.json"):  # what inspect reads
        read_meta(f"{folder}/adapter_config.json")
    assert not model.adapters and not model.heads  # nothing half done
    answer = httpx.post(server.url + "/v1/adapters", json={"name": f"bad_{case}", "path": folder}, headers=GOOD)
    assert answer.status_code == 422, answer.text
    assert "adapter_config.json" in answer.json()["detail"]
    retry = httpx.post(server.url + "/v1/adapters", json={"name": f"bad_{case}", "path": str(dirs["extra"])},
                       headers=GOOD)
    assert retry.status_code == 201  # the failed load left its name free
    assert httpx.delete(server.url + f"/v1/adapters/bad_{case}", headers=GOOD).status_code == 204


# -- silent or inconsistent answers --------------------------------------------------------------
def test_a_prompt_over_max_length_is_refused_not_cut(gen_server):
    long = " ".join(["word"] * 40) + " what is the question?"
    answer = httpx.post(gen_server.url + "/v1/generate", json={"prompt": long, "max_new_tokens": 2})
    assert answer.status_code == 413, answer.text
    assert "takes 16 at most" in answer.text
    assert httpx.post(gen_server.url + "/v1/generate", json={"prompt": "short", "max_new_tokens": 2}).status_code == 200


def test_finish_reason_is_stop_at_end_of_sequence(decoder):
    from adapterkit.serve.command import build_engine
    from adapterkit.serve.engine import Engine, GenerateJob, GenerateKey

    base, gen = decoder
    built = build_engine(ServeConfig(model=str(base), adapters={"poet": str(gen["poet"])}))
    prompt = built.encode_prompt("the sea")
    config = built.model.model.generation_config
    config.eos_token_id = None
    key = GenerateKey(max_new_tokens=6, temperature=0.0)
    free = built.generate(key, [GenerateJob("poet", prompt, [])])[0]
    assert free["finish_reason"] == "length" and free["tokens"] == 6
    first = built.tokenizer(free["text"], add_special_tokens=False)["input_ids"][0]
    config.eos_token_id = first  # the model's first greedy token now ends the sequence
    engine = Engine(built.model, built.tokenizer, built.config)
    ended = engine.generate(key, [GenerateJob("poet", prompt, [])])[0]
    assert ended["finish_reason"] == "stop" and ended["tokens"] <= 1


def test_queue_depth_returns_to_zero_when_a_queued_request_times_out(encoder):
    base, dirs = encoder
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, batch_window=0.5, timeout=0.1)
    with Running(config) as running:
        assert httpx.post(running.url + "/v1/classify", json={"adapter": "sent", "texts": ["x"]}).status_code == 504
        time.sleep(0.8)  # past the window
        assert _metric(running.url, "adapterkit_queue_depth") == 0
        assert httpx.get(running.url + "/health").json()["queue"] == 0


def test_a_body_over_the_limit_is_counted_under_its_endpoint(server):
    answer = httpx.post(server.url + "/v1/classify", json={"adapter": "sent", "texts": ["x" * 30_000]})
    assert answer.status_code == 413
    assert _metric(server.url, 'adapterkit_request_errors_total{endpoint="/v1/classify",status="413"}') >= 1
    assert _metric(server.url, 'adapterkit_request_errors_total{endpoint="other",status="413"}') == 0


def test_a_client_that_leaves_mid_body_counts_as_499(server):
    before400 = _metric(server.url, 'adapterkit_request_errors_total{endpoint="/v1/classify",status="400"}')
    before499 = _metric(server.url, 'adapterkit_request_errors_total{endpoint="/v1/classify",status="499"}')
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"adapter\": ")
        time.sleep(0.2)
    deadline = time.monotonic() + 60  # a liveness bound: generous for a loaded machine
    while _metric(server.url, 'adapterkit_request_errors_total{endpoint="/v1/classify",status="499"}') == before499:
        assert time.monotonic() < deadline, httpx.get(server.url + "/metrics").text
        time.sleep(0.05)
    assert _metric(server.url, 'adapterkit_request_errors_total{endpoint="/v1/classify",status="400"}') == before400


def test_two_loads_under_one_name_at_once_answer_201_and_409(server, encoder):
    _, dirs = encoder

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*[client.post("/v1/adapters", json={"name": "twin", "path": str(dirs["extra"])},
                                                      headers=GOOD) for _ in range(2)])

    codes = sorted(a.status_code for a in asyncio.run(fire()))
    assert codes == [201, 409]
    assert httpx.delete(server.url + "/v1/adapters/twin", headers=GOOD).status_code == 204


# -- slow clients --------------------------------------------------------------------------------
def _stall(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if kind == "header":
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-ty")
    elif kind == "body":
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 5000\r\n\r\n{\"adapter\": \"sent\"")
    return sock  # "idle": connected, nothing sent


def _closed_by(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("cap", [0, 60])
def test_slow_clients_are_timed_out_and_do_not_block_others(encoder, cap):
    """300 connections that stall mid-header, mid-body or before a byte: normal requests are
    still answered while they hang, and each is closed within the read timeout (3 s); with a
    cap of 60 connections the oldest stalled ones make room for the normal requests."""
    base, dirs = encoder
    config = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"])}, read_timeout=3.0,
                         max_connections=cap)
    with Running(config) as running:
        start = time.monotonic()
        stalled = [_stall(running.port, ("header", "body", "idle")[i % 3]) for i in range(300)]
        try:
            with httpx.Client(base_url=running.url, timeout=10) as client:
                for _ in range(3):
                    answer = client.post("/v1/classify", json={"adapter": "sent", "texts": ["fine"]})
                    assert answer.status_code == 200, answer.text
            assert time.monotonic() - start < 3.0  # answered while the stalled connections were open
            deadline = start + 3.0 + 1.5
            assert all(_closed_by(s, deadline) for s in stalled)
        finally:
            for s in stalled:
                s.close()
        metrics = httpx.get(running.url + "/metrics").text
        assert 'status="500"' not in metrics


def test_stalled_clients_do_not_exhaust_a_low_descriptor_limit(encoder, tmp_path):
    """``adapterkit serve`` as a process under ``ulimit -n 160`` (the cap then is 96 connections):
    200 stalled connections do not make normal requests fail (they used to: every accept failed)."""
    import resource
    import subprocess
    import sys

    from serve_helpers import free_port

    base, dirs = encoder
    port = free_port()
    (tmp_path / "serve.json").write_text(json.dumps({"model": str(base), "adapters": {"sent": str(dirs["sent"])}}))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    proc = subprocess.Popen([sys.executable, "-m", "adapterkit", "serve", "--config", str(tmp_path / "serve.json"),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=low_limit)
    stalled: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        stalled = [_stall(port, ("header", "body", "idle")[i % 3]) for i in range(200)]
        for _ in range(3):
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"adapter": "sent", "texts": ["fine"]},
                                timeout=10)
            assert answer.status_code == 200, answer.text
    finally:
        for s in stalled:
            s.close()
        proc.terminate()
        proc.wait(30)
