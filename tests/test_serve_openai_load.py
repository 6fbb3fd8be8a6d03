"""64 concurrent streaming clients over 8 adapters of mixed methods (prompts of 5-200 tokens,
max_tokens 8-128) on one continuous batch: every greedy answer equals that request alone."""

from __future__ import annotations

import asyncio
import random
import time

import openai

from adapterkit.serve.config import ServeConfig
from serve_helpers import Running
from serve_openai_helpers import METHODS, Reference, make_chat_llama


def test_64_streaming_clients_over_8_adapters_equal_generate_alone(tmp_path):
    base, dirs = make_chat_llama(tmp_path)
    config = ServeConfig(model=str(base), adapters={n: str(d) for n, d in dirs.items()}, max_new_tokens=128,
                         max_running_rows=64)
    ref = Reference(base, dirs)
    rng = random.Random(0)
    names = list(METHODS)  # 8 adapters: LoRA, bottleneck, IA3, prefix, prompt tuning (2 lengths), union, parallel
    requests = [(names[i % len(names)], [rng.randrange(1000, 49000) for _ in range(rng.randint(5, 200))],
                 rng.randint(8, 128)) for i in range(64)]
    with Running(config) as running:
        api = running.app.app.state.openai
        widest = []

        async def one(client, name, ids, max_tokens) -> tuple[str, str, int]:
            stream = await client.completions.create(model=name, prompt=ids, max_tokens=max_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            text, finish, used = "", None, 0
            async for chunk in stream:
                widest.append(len(api.batch.rows))
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage:
                    used = chunk.usage.completion_tokens
            return text, finish, used

        async def all_clients():
            client = openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            return await asyncio.gather(*(one(client, *r) for r in requests))

        start = time.monotonic()
        answers = asyncio.run(all_clients())  # any 4xx / 5xx raises here
        took = time.monotonic() - start
    for (name, ids, max_tokens), (text, finish, used) in zip(requests, answers):
        want, count = ref.generate(ids, name, max_tokens)
        assert (text, used) == (want, count), (name, len(ids), max_tokens)
        assert finish == ("length" if count == max_tokens else "stop")
    assert max(widest) > 32, max(widest)  # the rows really ran together
    assert took < 60, took
