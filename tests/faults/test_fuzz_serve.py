"""Property-based fuzzing of ``alignkit serve``: whatever a client sends to any endpoint (any JSON,
wrong types, huge numbers, NaN, lone surrogates, bytes that are not UTF-8, odd methods, paths and
headers), the server answers with a status below 500 and a JSON body (or, for a stream, events
that each parse), and lets the request's queue slot go.

Through Flask's test client against a tiny model, with limits that keep every accepted request
small (8 new tokens, 4 sequences), so 900 cases run in well under a minute.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flask")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from alignkit.serve import Engine, Limits, create_app  # noqa: E402

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PATHS = ["/v1/models", "/v1/models/tiny", "/v1/completions", "/v1/chat/completions"]


@pytest.fixture(scope="module")
def engine(tiny_base):
    import torch

    from alignkit.engine.models import load_causal_lm, load_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: threads only contend
    tok = load_tokenizer(tiny_base)
    yield Engine(load_causal_lm(tiny_base, tokenizer=tok), tok, "tiny", max_top_logprobs=5,
                 limits=Limits(max_tokens=8, max_sequences=4, chunk_tokens=4, max_body_bytes=4096))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(engine):
    return create_app(engine).test_client()


# -- what a client may send ---------------------------------------------------------------------

# Text with lone surrogates and characters outside latin-1 and the BMP.
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
numbers = st.one_of(st.integers(-3, 20), st.integers(), st.sampled_from([2**63, 2**64, 2**70,
                                                                        -(2**63) - 1, 10**400]),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(texts, inner, max_size=4), max_leaves=10)
token_ids = st.lists(st.one_of(st.integers(0, 399), st.integers(-5, 10**6)), max_size=6)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts, anything),
     "content": st.one_of(texts, st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": st.one_of(texts, anything)}),
         max_size=2), anything)}), max_size=3)


def maybe(strategy):
    """The field's plausible values, or anything at all."""
    return st.one_of(strategy, anything)


# Values of each field the server accepts: the cases that get as far as sampling, scoring, echo
# and streaming; then the same fields with anything in them.
good_texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
GOOD = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 2), "seed": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(), "stop": st.one_of(good_texts, st.lists(good_texts, max_size=4)),
}
GOOD_COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.one_of(good_texts, st.lists(st.integers(0, 399), min_size=1, max_size=6),
                         st.lists(good_texts, min_size=1, max_size=2))},
    optional={**GOOD, "max_tokens": st.integers(0, 8), "logprobs": st.integers(0, 5),
              "echo": st.booleans()})
GOOD_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]),
                                                 "content": good_texts}), min_size=1, max_size=3)},
    optional={**GOOD, "logprobs": st.just(True), "top_logprobs": st.integers(0, 5),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})
WILD = st.fixed_dictionaries({}, optional={
    "model": maybe(st.sampled_from(["tiny", "other"])),
    "prompt": maybe(st.one_of(texts, st.lists(texts, max_size=3), token_ids,
                              st.lists(token_ids, max_size=2))),
    "messages": maybe(messages),
    **{k: maybe(numbers) for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p",
                                   "n", "seed", "top_logprobs", "presence_penalty")},
    "logprobs": maybe(st.one_of(st.booleans(), numbers)),
    "echo": maybe(st.booleans()), "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": anything})),
    "stop": maybe(st.one_of(texts, st.lists(texts, max_size=5))),
    "logit_bias": anything, "best_of": anything})
requests_ = st.one_of(st.tuples(st.just("/v1/completions"), GOOD_COMPLETIONS),
                      st.tuples(st.just("/v1/chat/completions"), GOOD_CHAT),
                      st.tuples(st.sampled_from(PATHS[2:]), st.one_of(WILD, anything)))
bodies = st.one_of(WILD, anything)
# What an HTTP client can put in a header: no line breaks (werkzeug's client refuses them).
header_texts = st.text(st.characters(codec=None, exclude_categories=("Cc",)), max_size=12)


def encoded(body, ascii_only: bool) -> bytes:
    """JSON text of ``body``: escaped (lone surrogates arrive as valid JSON escapes) or as UTF-8
    (lone surrogates make the bytes invalid UTF-8)."""
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# -- what the server must answer ----------------------------------------------------------------


def check(engine, resp, method: str) -> None:
    data = resp.get_data()
    resp.close()
    hypothesis.event(f"status {resp.status_code}" + (" stream" if resp.mimetype ==
                                                     "text/event-stream" else ""))
    assert resp.status_code < 500, data[:500]
    assert engine.in_flight == 0, "a request kept its queue slot"
    if method == "HEAD" or (method == "OPTIONS" and resp.status_code == 200):
        return
    if resp.mimetype == "text/event-stream":
        events = [e for e in data.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        for e in events[:-1]:
            assert e.startswith("data: ") and "error" not in json.loads(e[len("data: "):])
        return
    assert resp.mimetype == "application/json", data[:200]
    reply = json.loads(data)
    if resp.status_code >= 400:
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    elif "choices" in reply:
        assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])


@settings(FUZZ, max_examples=400)
@given(request=requests_, ascii_only=st.booleans())
def test_request_bodies(engine, client, request, ascii_only):
    path, body = request
    resp = client.post(path, data=encoded(body, ascii_only), content_type="application/json")
    check(engine, resp, "POST")


@settings(FUZZ, max_examples=300)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
       path=st.one_of(st.sampled_from(PATHS + ["/", "/v1", "/v1/embeddings", "/v1/models/x/y"]),
                      st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), max_size=20)
                      .map(lambda p: "/v1/" + p)),
       body=st.one_of(st.binary(max_size=64), bodies.map(lambda b: encoded(b, True))),
       headers=st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "Accept",
                                                "Content-Encoding", "X-Odd", "Expect"]),
                               st.text(st.characters(max_codepoint=0xFF, exclude_categories=("Cc",)),
                                       max_size=30), max_size=4))
def test_any_request(engine, client, method, path, body, headers):
    resp = client.open(path, method=method, data=body, headers=headers)
    check(engine, resp, method)


@settings(FUZZ, max_examples=200)
@given(key=header_texts.filter(bool), sent=st.one_of(st.none(), header_texts,
                                              header_texts.map(lambda t: "Bearer " + t)))
def test_authorization_headers(engine, key, sent):
    # The right header (sent None) carries the key as UTF-8 bytes, which WSGI hands over as
    # latin-1 text.
    right = f"Bearer {key}".encode("utf-8", "surrogatepass").decode("latin-1")
    header = right if sent is None else sent
    client = create_app(engine, api_key=key).test_client()
    resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                       headers={"Authorization": header})
    assert resp.status_code == (200 if header == right else 401) and resp.is_json
    check(engine, resp, "POST")
