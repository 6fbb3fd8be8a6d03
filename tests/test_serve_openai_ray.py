"""The OpenAI endpoints under ``serve --ray``: routed by ``model`` to replicas holding the
adapter, answering like the single-process server; ``/v1/models`` lists the whole deployment."""

from __future__ import annotations

import os

import httpx
import openai
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'adapterkit[ray]')")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from adapterkit.serve import ray_deployment  # noqa: E402
from adapterkit.serve.config import ServeConfig  # noqa: E402

from serve_helpers import Running, free_port  # noqa: E402
from serve_openai_helpers import make_chat_llama  # noqa: E402


def test_adapter_of_reads_model_on_openai_paths():
    body = b'{"model": "lora", "adapter": "x", "prompt": "hi"}'
    assert ray_deployment._adapter_of("/v1/completions", body) == "lora"
    assert ray_deployment._adapter_of("/v1/chat/completions", body) == "lora"
    assert ray_deployment._adapter_of("/v1/generate", body) == "x"
    assert ray_deployment._adapter_of("/v1/models", body) == ""
    assert ray_deployment._adapter_of("/v1/completions", b"{bad") == ""


def test_stream_asgi_passes_each_chunk_on_as_it_is_sent_and_tells_the_app_when_the_client_leaves():
    import asyncio

    async def scenario():
        second, left = asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send):
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"one", "more_body": True})
            await second.wait()
            await send({"type": "http.response.body", "body": b"two", "more_body": True})
            if (await receive())["type"] == "http.disconnect":
                left.set()

        chunks = ray_deployment.stream_asgi(app, "POST", "/x", b"", [], b"{}")
        assert await chunks.__anext__() == (200, [(b"content-type", b"text/plain")])
        assert await chunks.__anext__() == b"one"  # before the app has sent its second chunk
        second.set()
        assert await chunks.__anext__() == b"two"
        await chunks.aclose()  # the client leaves mid-stream
        await asyncio.wait_for(left.wait(), 5)

    asyncio.run(scenario())


def test_openai_endpoints_under_ray_answer_like_the_single_process_server(tmp_path):
    base, dirs = make_chat_llama(tmp_path)
    adapters = {n: str(dirs[n]) for n in ("lora", "prompt", "bn")}
    single = ServeConfig(model=str(base), adapters=adapters)
    scaled = ServeConfig(model=str(base), adapters=adapters, host="127.0.0.1", port=free_port(), ray=True,
                         replicas=1, max_num_models_per_replica=2, replica_cpus=0.5, torch_threads=1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        url = ray_deployment.run(scaled, blocking=False)
        with Running(single) as running:
            mine = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            twin = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
            assert {m.id for m in mine.models.list()} == {m.id for m in twin.models.list()} == {str(base), *adapters}
            for model in ("lora", "prompt", "bn", "lora", str(base)):  # 3 adapters, 2 resident at most
                ask = dict(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
                assert mine.completions.create(**ask).choices[0].text == twin.completions.create(**ask).choices[0].text
            chunks = list(mine.completions.create(model="prompt", prompt="The sea", max_tokens=6, temperature=0,
                                                  stream=True))
            assert len(chunks) > 1
            assert "".join(c.choices[0].text for c in chunks if c.choices) == twin.completions.create(
                model="prompt", prompt="The sea", max_tokens=6, temperature=0).choices[0].text
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                    "model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "stream": True}) as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                assert "x-adapterkit-replica" in events.headers
                assert [line for line in events.iter_lines() if line][-1] == "data: [DONE]"
            with pytest.raises(openai.NotFoundError):
                mine.completions.create(model="nope", prompt="x", max_tokens=2)
            refused = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
            assert refused.status_code == 403 and "redeploy" in refused.json()["error"]["message"]
    finally:
        serve.shutdown()
        ray.shutdown()
