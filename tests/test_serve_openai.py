"""The OpenAI-compatible endpoints against a real server, with the official ``openai`` package
(sync, async, streaming) and ``curl -N``: answers equal ``generate`` alone, streamed text equals
the answer, errors are the package's exception classes."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest

from adapterkit.serve.config import ServeConfig
from serve_helpers import Running, make_decoder
from serve_openai_helpers import Reference, make_chat_llama

TOKEN = "s3cret"
PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    base, dirs = make_chat_llama(root, hot=("par",))
    config = ServeConfig(model=str(base), adapters={n: str(d) for n, d in dirs.items() if n != "par"},
                         admin_token=TOKEN, allowed_roots=(str(root / "hot"),), max_new_tokens=64)
    with Running(config) as running:
        yield running, Reference(base, dirs), str(base), dirs


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup[0].url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_and_every_adapter_in_vllms_shape(setup, client):
    running, _, base, _ = setup
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {base, "lora", "bn", "ia3", "prefix", "prompt", "prompt3", "union"}
    assert cards[base].parent is None and cards[base].root == base and cards[base].object == "model"
    assert cards["lora"].parent == base and cards["lora"].root.endswith("adapters/lora")
    assert isinstance(cards["lora"].created, int) and cards["lora"].owned_by == "adapterkit"


@pytest.mark.parametrize("model", ["base", "lora", "bn", "prompt", "prefix", "union"])
def test_completions_equal_generate_alone(setup, client, model):
    running, ref, base, _ = setup
    name = base if model == "base" else model
    answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    text, count = ref.generate(ref.ids(PROMPT), None if model == "base" else model, 12)
    assert answer.choices[0].text == text and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(ref.ids(PROMPT)) and answer.usage.completion_tokens == count == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12 and answer.model == name


@pytest.mark.parametrize("model", ["base", "ia3", "prompt3"])
def test_chat_uses_the_template_and_equals_generate_alone(setup, client, model):
    running, ref, base, _ = setup
    answer = client.chat.completions.create(model=base if model == "base" else model, messages=CHAT, max_tokens=10,
                                            temperature=0)
    ids = ref.chat_ids(CHAT)
    text, count = ref.generate(ids, None if model == "base" else model, 10)
    assert answer.choices[0].message.content == text and answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == count


def test_streamed_text_equals_the_answer_sync_and_async(setup, client):
    running, ref, base, _ = setup
    whole = client.completions.create(model="lora", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="lora", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20

    async def chat() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        alone = await aclient.chat.completions.create(model="prompt", messages=CHAT, max_tokens=15, temperature=0)
        stream = await aclient.chat.completions.create(model="prompt", messages=CHAT, max_tokens=15, temperature=0,
                                                       stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream]
        return alone.choices[0].message.content, "".join(parts)

    alone, streamed = asyncio.run(chat())
    assert streamed == alone == ref.generate(ref.chat_ids(CHAT), "prompt", 15)[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_streams_server_sent_events(setup):
    running = setup[0]
    body = json.dumps({"model": "bn", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-D", "-", running.url + "/v1/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=60)
    head, _, events = out.stdout.partition("\n\n")  # text mode: \r\n read as \n
    assert "text/event-stream" in head.lower(), out
    lines = [line for line in events.split("\n\n") if line.strip()]
    assert lines and lines[-1] == "data: [DONE]", repr(out.stdout[:600])
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def test_logprobs_n_seed_and_stop(setup, client):
    running, ref, _, _ = setup
    text, _ = ref.generate(ref.ids(PROMPT), "lora", 12)
    answer = client.completions.create(model="lora", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3, n=2)
    assert [c.text for c in answer.choices] == [text, text] and answer.usage.completion_tokens == 24
    lp = answer.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.top_logprobs[0]) == 3
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="ia3", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 4 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    stop = text.split()[3]
    cut = client.completions.create(model="lora", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="bn", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # seeded: reproducible
    assert sampled[0].choices[0].text != sampled[0].choices[1].text  # choice j samples with seed + j


def test_errors_are_the_packages_exceptions(setup, client):
    running = setup[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="lora", prompt=PROMPT, temperature=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="lora", prompt=PROMPT, max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="no tokens"):
        client.completions.create(model="lora", prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="lora", prompt=PROMPT, echo=True)
    bad = openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="admin token"):
        bad.post("/load_lora_adapter", body={"lora_name": "par", "lora_path": "x"}, cast_to=str)
    with pytest.raises(openai.BadRequestError, match="5 prompt positions"):  # this row only; the server goes on
        client.completions.create(model="prompt", prompt=[1000] * 450, max_tokens=60, temperature=0)
    raw = httpx.post(running.url + "/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(running.url + "/v1/completions", json={"model": "lora"})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"


def test_vllm_load_and_unload_any_method(setup):
    running, ref, base, dirs = setup
    admin = openai.OpenAI(base_url=running.url + "/v1", api_key=TOKEN, max_retries=0)
    said = admin.post("/load_lora_adapter", body={"lora_name": "par", "lora_path": str(dirs["par"])}, cast_to=str)
    assert "added" in said and "par" in [m.id for m in admin.models.list()]  # listed at once
    got = admin.completions.create(model="par", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert got == ref.generate(ref.ids(PROMPT), "par", 6)[0]
    with pytest.raises(openai.ConflictError):
        admin.post("/load_lora_adapter", body={"lora_name": "par", "lora_path": str(dirs["par"])}, cast_to=str)
    with pytest.raises(openai.PermissionDeniedError, match="outside the allowed roots"):
        admin.post("/load_lora_adapter", body={"lora_name": "x2", "lora_path": str(dirs["lora"])}, cast_to=str)
    assert "removed" in admin.post("/unload_lora_adapter", body={"lora_name": "par"}, cast_to=str)
    assert "par" not in [m.id for m in admin.models.list()]
    with pytest.raises(openai.NotFoundError):
        admin.completions.create(model="par", prompt=PROMPT, max_tokens=2)


def test_a_client_that_leaves_mid_stream_frees_its_row(setup):
    running = setup[0]
    api = running.app.app.state.openai
    body = {"model": "lora", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as response:
        next(response.iter_lines())  # the first token has come: the row runs
        steps = api.batch.steps
    deadline = time.monotonic() + 60  # a liveness bound: generous for a loaded machine
    while api.batch.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.batch.rows == [] and api.batch.steps - steps < 60  # it left long before its 64 tokens
    while running.app.app.state.server.registry.held("lora") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not running.app.app.state.server.registry.held("lora")  # its hold on the adapter is released


def test_chat_without_a_template_is_a_clear_400_and_old_endpoints_stay(tmp_path):
    base, dirs = make_decoder(tmp_path)  # the minilm tokenizer: no chat template
    with Running(ServeConfig(model=str(base), adapters={"poet": str(dirs["poet"])})) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client.chat.completions.create(model="poet", messages=CHAT)
        assert client.completions.create(model="poet", prompt="the sea", max_tokens=3, temperature=0).choices[0].text
        assert httpx.post(running.url + "/v1/generate", json={"prompt": "the sea", "adapter": "poet",
                                                              "max_new_tokens": 3}).status_code == 200


def test_schemathesis_finds_no_500_on_the_openai_endpoints(setup, tmp_path):
    """Every check of ``schemathesis`` on the OpenAI paths but ``positive_data_acceptance`` (a
    schema-valid body may name a model that does not exist: 404)."""
    import sys
    from pathlib import Path

    running = setup[0]
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    done = subprocess.run([exe, "run", running.url + "/openapi.json", "--checks", "all", "--exclude-checks",
                           "positive_data_acceptance", "--include-path-regex",
                           "^/v1/(completions|chat|models|load_lora|unload_lora)", "--max-examples", "25",
                           "--seed", "1",
                           "-H", f"Authorization: Bearer {TOKEN}"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]


def test_a_full_queue_answers_429(tmp_path):
    base, dirs = make_chat_llama(tmp_path)
    config = ServeConfig(model=str(base), adapters={"lora": str(dirs["lora"])}, queue_size=1)
    with Running(config) as running:
        api, server = running.app.app.state.openai, running.app.app.state.server
        hold = threading.Event()
        server.executor.submit(hold.wait)  # the model's thread is busy: nothing leaves the queue
        body = {"model": "lora", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        first: list = []
        waiting = threading.Thread(target=lambda: first.append(httpx.post(running.url + "/v1/completions", json=body,
                                                                          timeout=60)))
        waiting.start()
        deadline = time.monotonic() + 60  # a liveness bound: generous for a loaded machine
        while not api.batch.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.RateLimitError, match="queue is full") as refused:
                client.completions.create(**body)
            assert refused.value.response.headers["retry-after"] == "1"
        finally:
            hold.set()
        waiting.join(60)
        assert first[0].status_code == 200  # the queued one is answered once the thread is free


def test_the_decode_loop_limits_are_serve_flags():
    from adapterkit.cli import build_parser
    from adapterkit.errors import AdapterError
    from adapterkit.serve.command import config_from_args

    args = build_parser().parse_args(["serve", "--model", "m", "--max-running-rows", "8", "--max-running-tokens", "999"])
    config = config_from_args(args)
    assert (config.max_running_rows, config.max_running_tokens) == (8, 999)
    with pytest.raises(AdapterError, match="max_running_rows must be >= 1"):
        config_from_args(build_parser().parse_args(["serve", "--model", "m", "--max-running-rows", "0"]))


def test_the_input_rules_of_the_other_endpoints_apply_in_openais_shape(setup):
    """Lone surrogates, NaN, tiny temperatures, deep JSON, a prompt longer than the server takes and
    a folder that fails to load: each a 400 with OpenAI's error object (valid JSON), never a 500."""
    running, _, _, dirs = setup
    url = running.url + "/v1"

    def post(path: str, raw: str, **headers) -> httpx.Response:
        return httpx.post(url + path, content=raw.encode(), headers={"Content-Type": "application/json", **headers},
                          timeout=60)

    def refused(answer: httpx.Response, param=None, match: str = "") -> dict:
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]  # valid JSON: the surrogate / NaN is shown as text
        assert error["type"] == "invalid_request_error" and match in error["message"], error
        if param is not None:
            assert error["param"] == param, error
        return error

    refused(post("/completions", '{"model": "lora", "prompt": "a \\ud800 b"}'), "prompt", "surrogate")
    refused(post("/completions", '{"model": "lora", "prompt": ["ok", "\\udfff"]}'), "prompt", "surrogate")
    refused(post("/completions", '{"model": "\\ud800", "prompt": "x"}'), "model", "surrogate")
    refused(post("/completions", '{"model": "lora", "prompt": "x", "stop": ["\\ud800"]}'), "stop", "surrogate")
    refused(post("/chat/completions", '{"model": "lora", "messages": [{"role": "user", "content": "\\ud800"}]}'),
            "messages.0.content", "surrogate")
    refused(post("/chat/completions", '{"model": "lora", "messages": [{"role": "user", "content": '
                                      '[{"type": "text", "text": "\\udc00"}]}]}'), "messages.0.content", "surrogate")
    refused(post("/completions", '{"model": "lora", "prompt": "x", "temperature": 1e-9}'), "temperature", "too small")
    refused(post("/completions", '{"model": "lora", "prompt": "x", "temperature": NaN}'), "temperature")
    refused(post("/completions", '{"model": "lora", "prompt": "x", "top_p": NaN}'), "top_p")
    refused(post("/completions", "[" * 100_000 + "]" * 100_000))
    refused(post("/completions", '{"model": "lora", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"))
    limit = running.app.app.state.openai.engine.max_length
    error = refused(post("/completions", json.dumps({"model": "lora", "prompt": [5] * (limit + 1), "max_tokens": 1})),
                    "prompt", f"maximum prompt length is {limit}")
    assert error["code"] == "context_length_exceeded"
    tiny = httpx.post(url + "/completions", json={"model": "lora", "prompt": PROMPT, "max_tokens": 2,
                                                  "temperature": 1e-6}, timeout=60)
    assert tiny.status_code == 200  # the floor itself samples (as greedy)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    refused(post("/load_lora_adapter", '{"lora_name": "x", "lora_path": "\\ud800"}', **admin), "lora_path",
            "surrogate")
    broken = dirs["par"].parent / "broken"
    broken.mkdir(exist_ok=True)
    for config in ("{not json", "[" * 100_000 + "]" * 100_000):
        (broken / "adapter_config.json").write_text(config)
        refused(post("/load_lora_adapter", json.dumps({"lora_name": "broken", "lora_path": str(broken)}), **admin),
                "lora_path", "Cannot load")
    again = post("/load_lora_adapter", json.dumps({"lora_name": "broken", "lora_path": str(dirs["par"])}), **admin)
    assert again.status_code == 200, again.text  # the failed loads left the name free
    assert post("/unload_lora_adapter", '{"lora_name": "broken"}', **admin).status_code == 200
