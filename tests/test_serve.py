"""``alignkit serve`` over real loopback HTTP, and the HTTP judge against it: OpenAI request and
response shapes, log-probs against an independent forward pass, errors (JSON, never HTML), API
keys; the limits on one request's cost, turns between requests, work dropped when the client goes
away; the openai client's completions, chat, streams and echo scoring (and lm-eval's, where it is
installed); the judge's retries on 500 and 429, timeouts on a stalled server, the concurrency
limit, and HTTP == local soft labels."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

pytest.importorskip("flask")
pytestmark = pytest.mark.usefixtures("one_thread")

from alignkit.engine.judges import HttpConfig, JudgeConfig, PairwiseJudge  # noqa: E402
from alignkit.serve import Engine, create_app, serve_until_interrupted  # noqa: E402

PAIR = (["I watched"], [" a good film."], [" a dull film."])


@pytest.fixture(scope="module")
def loaded(tiny_base):
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_base)
    return load_causal_lm(tiny_base, tokenizer=tok), tok


@pytest.fixture(scope="module")
def engine(loaded):
    # Every alternative may be asked for, so the soft labels can be compared exactly.
    return Engine(*loaded, "tiny", max_top_logprobs=10**4)


@contextlib.contextmanager
def serving(app_or_server):
    server = app_or_server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _werkzeug(app):
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log(self, *args):
            pass

    return make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)


@pytest.fixture(scope="module")
def base_url(engine):
    with serving(_werkzeug(create_app(engine))) as url:
        yield url


def post(url, body, headers=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the server -------------------------------------------------------------------------------


def test_models(base_url):
    with urllib.request.urlopen(base_url + "/models") as resp:
        data = json.loads(resp.read())
    assert [m["id"] for m in data["data"]] == ["tiny"] and data["object"] == "list"


def test_completions_logprobs_match_a_forward_pass(base_url, engine):
    from alignkit.data.formats import encode_prompt

    status, reply = post(base_url + "/completions", {"model": "tiny", "prompt": "I watched",
                                                     "max_tokens": 5, "temperature": 0,
                                                     "logprobs": 3})
    assert status == 200 and reply["object"] == "text_completion"
    [choice] = reply["choices"]
    tok, model = engine.tokenizer, engine.model
    prompt = encode_prompt("I watched", tok)
    assert reply["usage"]["prompt_tokens"] == len(prompt)
    # Greedy decoding by hand, with the log-probs of an unpadded forward pass.
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(reply["usage"]["completion_tokens"]):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            ids.append(int(lp.argmax()))
            expected.append(lp.max().item())
    new = ids[len(prompt):]
    if new[-1] == tok.eos_token_id:
        new = new[:-1]
    assert choice["text"] == tok.decode(new, skip_special_tokens=True)
    lps = choice["logprobs"]
    assert lps["token_logprobs"] == pytest.approx(expected[:len(lps["tokens"])], abs=1e-4)
    # Greedy: the chosen token is the most likely alternative; 3 alternatives per token.
    for token, top, lp in zip(lps["tokens"], lps["top_logprobs"], lps["token_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-5)
    assert lps["text_offset"][0] == 0


def test_chat_completions_shape_and_seed(base_url):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 6, "logprobs": True, "top_logprobs": 2, "seed": 7, "n": 2}
    status, reply = post(base_url + "/chat/completions", body)
    assert status == 200 and reply["object"] == "chat.completion" and len(reply["choices"]) == 2
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    for entry in choice["logprobs"]["content"]:
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    # The same seed samples the same completions.
    assert post(base_url + "/chat/completions", body)[1]["choices"] == reply["choices"]


def test_stop_strings_cut_the_text(base_url):
    body = {"prompt": "I watched", "max_tokens": 12, "temperature": 0}
    full = post(base_url + "/completions", body)[1]["choices"][0]["text"]
    assert len(full) > 2
    stop = full[2:4]
    cut = post(base_url + "/completions", {**body, "stop": [stop]})[1]["choices"][0]
    assert cut["text"] == full[:full.find(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body, status, param", [
    ("/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/completions", {"prompt": 3}, 400, "prompt"),
    ("/completions", {"prompt": "x", "model": "other"}, 404, "model"),
    ("/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/chat/completions", {"messages": []}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                           "top_logprobs": 2}, 400, "top_logprobs"),
])
def test_bad_requests_get_openai_errors(base_url, path, body, status, param):
    got, reply = post(base_url + path, body)
    assert got == status and reply["error"]["param"] == param and reply["error"]["message"]


def test_api_key(engine, monkeypatch):
    with serving(_werkzeug(create_app(engine, api_key="s3cret"))) as url:
        body = {"prompt": "x", "max_tokens": 1}
        assert post(url + "/completions", body)[0] == 401
        assert post(url + "/completions", body, {"Authorization": "Bearer s3cret"})[0] == 200
        # The judge reads the key from the environment variable its config names.
        cfg = JudgeConfig(model="tiny", backend="http", swap=False,
                          http=HttpConfig(base_url=url, api_key_env="ALIGNKIT_TEST_KEY",
                                          max_retries=3, backoff_s=0.01))
        monkeypatch.delenv("ALIGNKIT_TEST_KEY", raising=False)
        judge = PairwiseJudge(cfg)
        assert judge.judge(*PAIR)[0].label is None and judge.counts["failed"] == 1
        assert judge.backend.retries == 0                  # 401 is not retried
        monkeypatch.setenv("ALIGNKIT_TEST_KEY", "s3cret")
        [outcome] = PairwiseJudge(cfg).judge(*PAIR)[0].outcomes
        assert outcome.error is None and outcome.raw is not None and outcome.prompt_tokens > 0


def test_ctrl_c_stops_serving_and_closes_the_socket():
    class Interrupted:
        closed = False

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            self.closed = True

    server = Interrupted()
    serve_until_interrupted(server)                    # returns: Ctrl+C is the way to stop
    assert server.closed


# -- limits: what one request may cost --------------------------------------------------------


def _limited(loaded, **limits):
    """A quiet loopback server of a fresh engine with ``limits`` (the others default), answering
    HTTP-level errors as ``alignkit serve`` does; returns ``(engine, server)``."""
    from werkzeug.serving import make_server

    from alignkit.serve import Limits, request_handler

    engine = Engine(*loaded, "tiny", limits=Limits(**limits))

    class Quiet(request_handler()):
        def log(self, *args):
            pass

    return engine, make_server("127.0.0.1", 0, create_app(engine), threaded=True,
                               request_handler=Quiet)


def raw(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send bytes as they are to the server of ``url``; the status, headers and body of its
    answer."""
    import http.client
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def test_too_many_sequences_are_refused_naming_the_limit(base_url):
    # 17 prompts x n=16 = 272 sequences, over the default 256 (the request: 4,000 x 16).
    status, reply = post(base_url + "/completions", {"prompt": ["I watched"] * 17, "n": 16,
                                                     "max_tokens": 1})
    assert status == 400 and reply["error"]["param"] == "n"
    assert "272 sequences" in reply["error"]["message"]
    assert "--max-sequences" in reply["error"]["message"]
    assert post(base_url + "/completions", {"prompt": ["I watched"] * 16, "n": 16,
                                            "max_tokens": 1})[0] == 200


def test_max_tokens_over_the_cap_is_refused(base_url):
    status, reply = post(base_url + "/completions", {"prompt": "x", "max_tokens": 10**6})
    assert status == 400 and reply["error"]["param"] == "max_tokens"
    assert "limit of 4096 (--max-tokens)" in reply["error"]["message"]
    status, reply = post(base_url + "/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 4097})
    assert status == 400 and reply["error"]["param"] == "max_tokens"


def test_a_body_over_the_limit_gets_413_before_it_is_read(loaded):
    _, server = _limited(loaded, max_body_bytes=1000)
    with serving(server) as url:
        # 50 MB declared, 10 bytes sent: an answer at all shows that the server did not wait
        # for the rest (the old server waited for it until this client's timeout).
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 50000000\r\n\r\n")
        start = time.perf_counter()
        status, headers, body = raw(url, head, b'{"prompt":', timeout=5)
        assert status == 413 and time.perf_counter() - start < 4
        assert headers["Content-Type"] == "application/json"
        assert "limit of 1000 bytes (--max-body-bytes)" in json.loads(body)["error"]["message"]
        # A chunked body declares no length: it is cut off as it is read.
        chunk = json.dumps({"prompt": "x" * 2000}).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        status, _, body = raw(url, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        assert status == 413 and json.loads(body)["error"]["message"]
        assert post(url + "/completions", {"prompt": "x", "max_tokens": 1})[0] == 200


def test_a_full_queue_answers_503_with_retry_after(loaded):
    engine, server = _limited(loaded, max_queue=1)
    with serving(server) as url:
        first = {}
        with engine.turns:   # the model is busy: the first request waits for its turn
            thread = threading.Thread(target=lambda: first.update(
                reply=post(url + "/completions", {"prompt": "x", "max_tokens": 2})))
            thread.start()
            wait_until(lambda: engine.in_flight == 1)
            req = urllib.request.Request(url + "/completions", method="POST",
                                         data=json.dumps({"prompt": "x"}).encode())
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=10)
        thread.join(30)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert "--max-queue 1" in json.loads(refused.value.read())["error"]["message"]
    assert first["reply"][0] == 200 and engine.in_flight == 0


LONG = {"prompt": "I watched", "max_tokens": 200, "temperature": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_work_stops_when_the_client_goes_away(loaded, stream):
    import socket

    engine, server = _limited(loaded, chunk_tokens=2)
    with serving(server) as url:
        # Greedy decoding of this prompt never samples EOS: the whole request is 100 chunks.
        full = post(url + "/completions", LONG)[1]
        assert full["usage"]["completion_tokens"] == 200 and engine.chunks == 100
        body = json.dumps({**LONG, "stream": stream}).encode()
        sock = socket.create_connection((server.host, server.server_port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        wait_until(lambda: engine.chunks >= 103)
        sock.close()
        wait_until(lambda: engine.in_flight == 0)
    # It stopped within a chunk or two of the client leaving, not 97 chunks later.
    assert engine.chunks < 110 and engine.cancelled == 1


def test_a_short_request_is_not_starved_by_a_long_one(loaded):
    engine, server = _limited(loaded, chunk_tokens=2)
    done = {}

    def send(name, body):
        post(url + "/completions", body)
        done[name] = time.perf_counter()

    with serving(server) as url:
        long = threading.Thread(target=send, args=("long", LONG))
        long.start()
        wait_until(lambda: engine.chunks >= 2)
        send("short", {"prompt": "x", "max_tokens": 1})
        long.join(60)
    # The short request took its turn between two chunks of the long one (with one lock for a
    # whole request, it waited for all 100).
    assert done["short"] < done["long"]


def test_turns_are_taken_in_arrival_order():
    from alignkit.serve import _Turns

    turns, order = _Turns(), []

    def take(name):
        with turns:
            order.append(name)

    waiting = []
    with turns:
        for name in ("b", "c"):
            waiting.append(threading.Thread(target=take, args=(name,)))
            waiting[-1].start()
            # b must hold its ticket before c asks for one
            wait_until(lambda: turns._issued == len(waiting) + 1)
    take("a")   # the holder queues again at once: behind b and c, not before them
    for t in waiting:
        t.join(10)
    assert order == ["b", "c", "a"]


# -- every error is JSON ----------------------------------------------------------------------


def test_huge_seed_and_a_non_ascii_key_get_json_errors(engine):
    with serving(_werkzeug(create_app(engine, api_key="s3cret"))) as url:
        # Header values travel as latin-1: "é" is the byte 0xe9.
        status, reply = post(url + "/completions", {"prompt": "x"}, {"Authorization": "Bearer é"})
        assert status == 401 and reply["error"]["message"] == "invalid or missing API key"
        status, reply = post(url + "/completions", {"prompt": "x", "seed": 2**70},
                             {"Authorization": "Bearer s3cret"})
        assert status == 400 and reply["error"]["param"] == "seed"
        status, reply = post(url + "/completions", {"prompt": "x", "seed": -(2**63),
                                                    "max_tokens": 1},
                             {"Authorization": "Bearer s3cret"})
        assert status == 200


def test_every_error_is_json(loaded):
    _, server = _limited(loaded)
    with serving(server) as url:
        host = b"Host: x\r\n"
        cases = [
            (b"GET /v1/nothing HTTP/1.1\r\n" + host + b"\r\n", b"", 404),
            (b"GET /v1/completions HTTP/1.1\r\n" + host + b"\r\n", b"", 405),
            (b"GET /v1/models/other HTTP/1.1\r\n" + host + b"\r\n", b"", 404),
            (b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 9\r\n\r\n",
             b"{not json", 400),
            # Nesting deeper than Python's JSON parser recurses (RecursionError, not ValueError).
            (b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 100000\r\n\r\n",
             b"[" * 100000, 400),
            (b"POST /v1/completions HTTP/1.1\r\n" + host + b"Content-Length: 4\r\n\r\n",
             b"\xff\xfe\x00\x01", 400),
            # The HTTP layer's own errors, before the app sees the request.
            (b"GET /v1/models extra HTTP/1.1\r\n\r\n", b"", 400),
            (b"GET /v1/models HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"", 431),
        ]
        for head, body, expected in cases:
            status, headers, payload = raw(url, head, body)
            assert status == expected, (head[:40], status)
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(payload)["error"]["message"], head[:40]


def test_a_stream_that_fails_midway_ends_with_an_error_event(loaded, monkeypatch):
    from alignkit.serve import Limits

    engine = Engine(*loaded, "tiny", limits=Limits(chunk_tokens=2))
    generate = engine.generate

    def failing(seqs, p, alive):
        rounds = generate(seqs, p, alive)
        yield next(rounds)
        raise RuntimeError("the model broke")

    monkeypatch.setattr(engine, "generate", failing)
    resp = create_app(engine).test_client().post("/v1/completions", json={
        "prompt": "I watched", "max_tokens": 8, "temperature": 0, "stream": True})
    events = resp.get_data(as_text=True).strip().split("\n\n")
    resp.close()
    # The status went out with the first chunk; the failure is the last event, a JSON error
    # (openai's client raises it), with no traceback in it and no [DONE] after it.
    assert resp.status_code == 200 and len(events) == 2
    assert json.loads(events[0][len("data: "):])["choices"][0]["text"]
    error = json.loads(events[1][len("data: "):])["error"]
    assert error == {"message": "internal error (RuntimeError)", "type": "server_error",
                     "param": None, "code": None}
    assert engine.in_flight == 0


# -- the OpenAI client: completions, chat, streaming, echo scoring ------------------------


@pytest.fixture(scope="module")
def client(base_url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)


def test_openai_client_completions_and_chat(client, base_url):
    reply = client.completions.create(model="tiny", prompt="I watched", max_tokens=5,
                                      temperature=0, logprobs=2)
    ours = post(base_url + "/completions", {"model": "tiny", "prompt": "I watched",
                                            "max_tokens": 5, "temperature": 0, "logprobs": 2})[1]
    [choice] = reply.choices
    assert choice.text == ours["choices"][0]["text"] and len(choice.text) > 0
    assert choice.logprobs.token_logprobs == ours["choices"][0]["logprobs"]["token_logprobs"]
    assert reply.usage.completion_tokens == 5
    hi = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="tiny", messages=hi, max_tokens=4, seed=3, n=2,
                                          logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert all(len(e.top_logprobs) == 2 for e in chat.choices[0].logprobs.content)


def test_openai_client_streams_completions(client, engine):
    chunk = engine.limits.chunk_tokens
    body = {"model": "tiny", "prompt": "I watched", "max_tokens": 2 * chunk + chunk // 2,
            "temperature": 0, "logprobs": 1}
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True))
    # Greedy decoding never samples EOS here: two whole chunks of tokens and a half one.
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [len(c.choices[0].logprobs.tokens) for c in chunks] == [chunk, chunk, chunk // 2]
    streamed = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_openai_client_streams_chat(client):
    # A seed repeats a sample, streamed or not.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
            "seed": 11}
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(**body, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content and content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_a_stop_string_is_never_streamed(client, engine):
    chunk = engine.limits.chunk_tokens
    body = {"model": "tiny", "prompt": "I watched", "max_tokens": 2 * chunk, "seed": 5,
            "logprobs": 0}
    whole = client.completions.create(**body).choices[0]
    # A stop string that starts in the first chunk and ends in the second: the first chunk must
    # hold its start back until the second shows whether it completes.
    boundary = whole.logprobs.text_offset[chunk]
    stop = whole.text[boundary - 3:boundary + 4]
    assert whole.text.find(stop) == boundary - 3 and len(stop) == 7
    chunks = list(client.completions.create(**body, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text[:boundary - 3]
    assert chunks[-1].choices[0].finish_reason == "stop"


def _forward_logps(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logps[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()


def test_echo_scores_the_prompt_like_a_forward_pass(client, engine):
    from alignkit.data.formats import encode_prompt

    tok, model = engine.tokenizer, engine.model
    text = "I watched a good film."
    ids = encode_prompt(text, tok)
    # lm-eval's local-completions log-likelihood request: token ids, echo, one new token.
    reply = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, echo=True,
                                      logprobs=1, temperature=0)
    lps = reply.choices[0].logprobs
    assert len(lps.token_logprobs) == len(ids) + 1 and lps.token_logprobs[0] is None
    assert lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:len(ids)] == pytest.approx(_forward_logps(model, ids), abs=1e-5)
    assert lps.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
    for lp, top in zip(lps.token_logprobs[1:], lps.top_logprobs[1:]):
        assert max(top.values()) >= lp - 1e-6
    # Scoring alone: max_tokens 0 and a text prompt, echoed as it was sent.
    reply = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True,
                                      logprobs=0)
    [choice] = reply.choices
    assert choice.text == text and reply.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(_forward_logps(model, ids), abs=1e-5)
    # BOS is not in the text: the first word starts at 0, each token where the last one ended.
    assert choice.logprobs.text_offset[:2] == [0, 0]
    assert choice.logprobs.text_offset[-1] + len(choice.logprobs.tokens[-1]) == len(text)


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood(base_url, engine, tiny_base):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=base_url + "/completions", model="tiny",
                             tokenizer=str(tiny_base), tokenizer_backend="huggingface",
                             num_concurrent=1, max_retries=1, max_length=256)
    pairs = [("I watched", " a good film."), ("The plot", " was dull.")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    tok = engine.tokenizer
    for (context, continuation), (logp, _) in zip(pairs, got):
        ctx = lm.tok_encode(context)
        ids = ctx + lm.tok_encode(continuation)
        expected = sum(_forward_logps(engine.model, ids)[len(ctx) - 1:])
        assert logp == pytest.approx(expected, abs=1e-4), tok.decode(ids)


# -- the HTTP judge against the server ----------------------------------------------------


def _http_judge(url, **http):
    http = {"backoff_s": 0.01, "max_retries": 3, "timeout_s": 10.0, **http}
    return PairwiseJudge(JudgeConfig(model="tiny", backend="http", top_logprobs=10**4,
                                     http=HttpConfig(base_url=url, **http)))


def test_http_soft_labels_equal_local_ones(base_url, tiny_base):
    prompts, a, b = ["I watched", "The plot"] * 2, [" good", " was dull", " ok.", " fine"], \
        [" bad", " was great", " poor.", " dull"]
    remote = _http_judge(base_url).judge(prompts, a, b)
    local = PairwiseJudge(JudgeConfig(model=str(tiny_base))).judge(prompts, a, b)
    for r, loc in zip(remote, local):
        assert r.slot_probs == pytest.approx(loc.slot_probs, abs=1e-5)
        assert r.prob_a == pytest.approx(loc.prob_a, abs=1e-5)
    assert all(o.prompt_tokens > 0 and o.completion_tokens == 1 for j in remote for o in j.outcomes)


class Faulty:
    """A second loopback server in front of the real one: answers each request as the plan
    says ("500", "429", "stall") or, past the plan, forwards it; records concurrency."""

    def __init__(self, upstream: str, plan: list[str], stall_s: float = 3.0):
        self.plan, self.seen, self.in_flight, self.max_in_flight = list(plan), 0, 0, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    step = outer.plan[outer.seen] if outer.seen < len(outer.plan) else "forward"
                    outer.seen += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if step == "stall":
                        time.sleep(stall_s)
                        return
                    if step in ("500", "429"):
                        return self._send(int(step), b'{"error": {"message": "injected"}}',
                                          {"Retry-After": "0"} if step == "429" else {})
                    req = urllib.request.Request(upstream + self.path[len("/v1"):], data=body,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        self._send(resp.status, resp.read(), {})
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, status, payload, headers):
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False   # do not wait for a stalled handler on shutdown


def test_retries_on_500_and_429(base_url):
    faulty = Faulty(base_url, ["500", "429", "500"])
    with serving(faulty.server) as url:
        judge = _http_judge(url, concurrency=1)
        [j] = judge.judge(*PAIR)
    assert j.label is not None and judge.counts["failed"] == 0
    assert judge.backend.retries == 3 and faulty.seen == 5       # 3 faults + 2 answered orders
    expected = _http_judge(base_url).judge(*PAIR)[0]
    assert j.prob_a == pytest.approx(expected.prob_a, abs=1e-9)


def test_a_stalled_server_times_out_and_is_retried(base_url):
    faulty = Faulty(base_url, ["stall"], stall_s=3.0)
    with serving(faulty.server) as url:
        judge = _http_judge(url, concurrency=1, timeout_s=0.5)
        [j] = judge.judge(*PAIR)
    assert j.label is not None and judge.backend.retries == 1 and faulty.seen == 3


def test_giving_up_after_max_retries(base_url, tmp_path):
    from alignkit.data.store import PreferenceStore

    faulty = Faulty(base_url, ["500"] * 3)
    with serving(faulty.server) as url, PreferenceStore(tmp_path / "s.db") as store:
        judge = _http_judge(url, concurrency=1, max_retries=2)
        judge.store = store
        [j] = judge.judge(["I watched"], [" good"], [" bad"])
        # The first order failed after 1 + 2 attempts; the second went through.
        assert faulty.seen == 4 and judge.counts["failed"] == 1
        assert "gave up after 3 attempts" in j.outcomes[0].error
        assert j.prob_a == pytest.approx(1 - j.slot_probs[1])
        assert store.count("judgements_cache") == 1            # a failure is never cached
        # Healthy again: only the failed order is sent.
        [j2] = judge.judge(["I watched"], [" good"], [" bad"])
        assert faulty.seen == 5 and judge.counts["cache_hits"] == 1 and j2.outcomes[0].error is None


def test_client_errors_are_not_retried(base_url):
    judge = PairwiseJudge(JudgeConfig(model="no-such-model", backend="http", swap=False,
                                      http=HttpConfig(base_url=base_url, backoff_s=0.01)))
    [j] = judge.judge(*PAIR)
    assert j.label is None and judge.backend.retries == 0
    assert "HTTP 404" in j.outcomes[0].error


def test_concurrency_limit(base_url):
    faulty = Faulty(base_url, [])
    with serving(faulty.server) as url:
        judge = _http_judge(url, concurrency=2)
        judge.judge(["I watched"] * 4, [" good", " bad", " ok", " fine"],
                    [" bad", " good", " fine", " ok"])
    assert faulty.seen == 8 and 1 <= faulty.max_in_flight <= 2
