"""Property-based: whatever a client sends (Hypothesis strategies over the request schemas, with
lone surrogates, NaN / Infinity literals, extreme floats, deep nesting and raw invalid UTF-8),
the real server (uvicorn on 127.0.0.1, tiny models) answers below 500, and a good request sent at
the same moment gets the answer it gets alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterkit.serve.config import ServeConfig

from serve_helpers import Running, make_decoder, make_encoder

TOKEN = "s3cret"
CLASSIFY = {"adapter": "sent", "texts": ["a fine film", "dull"]}
GENERATE = {"prompt": "the sea", "adapter": "poet", "max_new_tokens": 4}
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    base, dirs = make_encoder(root / "enc")
    dbase, ddirs = make_decoder(root / "dec")
    encoder = ServeConfig(model=str(base), adapters={"sent": str(dirs["sent"]), "ner": str(dirs["ner"])},
                          batch_window=0.01, admin_token=TOKEN, allowed_roots=(str(dirs["extra"].parent),),
                          max_texts=8, max_chars=300)
    decoder = ServeConfig(model=str(dbase), adapters={"poet": str(ddirs["poet"])}, batch_window=0.01,
                          max_length=24, max_new_tokens=6, max_chars=300)
    with Running(encoder) as enc, Running(decoder) as dec:
        alone = {"classify": httpx.post(enc.url + "/v1/classify", json=CLASSIFY, timeout=30).json(),
                 "generate": httpx.post(dec.url + "/v1/generate", json=GENERATE, timeout=30).json()}
        yield enc, dec, alone


# -- strategies ----------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "x\ud83d", "\udc00\ud800"])
TEXT = st.one_of(st.text(max_size=40), SURROGATES, st.text(st.characters(codec="utf-8"), max_size=10).map(
    lambda t: t + "\ud801"))
EXTREME = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e-45, 1e-300, 5e-324, -0.0, 1e308, -1e308,
                           2 ** 63, -(2 ** 63), 10 ** 30])
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), EXTREME,
                   TEXT)
ANY = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                   max_leaves=8)


def field(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value of the field, sometimes anything at all."""
    return st.one_of(good, good, ANY)


CLASSIFY_BODY = st.fixed_dictionaries(
    {"adapter": field(st.sampled_from(["sent", "ner", "nope", "a/b", ""]))},
    optional={"texts": field(st.lists(TEXT, max_size=4)), "text_pairs": field(st.lists(TEXT, max_size=4)),
              "extra": ANY})
GENERATE_BODY = st.fixed_dictionaries(
    {"prompt": field(TEXT)},
    optional={"adapter": field(st.sampled_from(["poet", "nope", None])),
              "max_new_tokens": field(st.one_of(st.integers(-3, 8), st.just(4))),
              "temperature": field(st.one_of(EXTREME, st.floats(0, 6), st.just(0.0))),
              "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=3)))})
LOAD_BODY = st.fixed_dictionaries({"name": field(st.sampled_from(["x", "a/b", "", "sent"])), "path": field(TEXT)})


@st.composite
def raw_body(draw, bodies: st.SearchStrategy) -> bytes:
    """A body as bytes: JSON with NaN / Infinity literals, surrogates as \\u escapes or as raw
    (invalid) UTF-8, or a field replaced by very deep nesting."""
    body = draw(bodies)
    how = draw(st.sampled_from(["escaped", "raw", "deep"]))
    if how == "escaped":
        return json.dumps(body, allow_nan=True).encode()
    if how == "raw":
        return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    depth = draw(st.integers(1, 20_000))
    key = draw(st.sampled_from(sorted(body) or ["texts"]))
    rest = json.dumps({k: v for k, v in body.items() if k != key}, allow_nan=True)[1:-1]
    return ('{"' + key + '": ' + "[" * depth + "]" * depth + (", " + rest if rest else "") + "}").encode()


# -- the properties ------------------------------------------------------------------------------
async def _together(url: str, path: str, bad: bytes, good_path: str, good: dict, headers: dict):
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            client.post(path, content=bad, headers={"content-type": "application/json", **headers}),
            client.post(good_path, json=good))


def _same_classify(got: dict, alone: dict) -> None:
    assert got["adapter"] == alone["adapter"] and len(got["results"]) == len(alone["results"])
    for mine, theirs in zip(got["results"], alone["results"]):
        assert mine["label"] == theirs["label"]
        assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)  # batch padding: float noise


@SETTINGS
@given(body=raw_body(CLASSIFY_BODY))
def test_classify_never_500_and_never_hurts_a_neighbour(servers, body):
    enc, _, alone = servers
    bad, good = asyncio.run(_together(enc.url, "/v1/classify", body, "/v1/classify", CLASSIFY, {}))
    assert bad.status_code < 500, (body[:300], bad.text[:500])
    assert good.status_code == 200, good.text
    _same_classify(good.json(), alone["classify"])


@SETTINGS
@given(body=raw_body(GENERATE_BODY))
def test_generate_never_500_and_never_hurts_a_neighbour(servers, body):
    _, dec, alone = servers
    bad, good = asyncio.run(_together(dec.url, "/v1/generate", body, "/v1/generate", GENERATE, {}))
    assert bad.status_code < 500, (body[:300], bad.text[:500])
    assert good.status_code == 200 and good.json() == alone["generate"], good.text


@SETTINGS
@given(body=raw_body(LOAD_BODY), token=st.booleans())
def test_admin_load_never_500(servers, body, token):
    enc, _, alone = servers
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    bad, good = asyncio.run(_together(enc.url, "/v1/adapters", body, "/v1/classify", CLASSIFY, headers))
    assert bad.status_code < 500, (body[:300], bad.text[:500])
    assert bad.status_code != 201  # nothing a strategy makes lies under the allowed root
    assert good.status_code == 200
    _same_classify(good.json(), alone["classify"])
