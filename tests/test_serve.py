"""``alignkit serve`` over real loopback HTTP, and the HTTP judge against it: OpenAI request and
response shapes, log-probs against an independent forward pass, errors, API keys; retries on 500
and 429, timeouts on a stalled server, the concurrency limit, and HTTP == local soft labels."""

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

from alignkit.engine.judges import HttpConfig, JudgeConfig, PairwiseJudge  # noqa: E402
from alignkit.serve import Engine, create_app, serve_until_interrupted  # noqa: E402

PAIR = (["I watched"], [" a good film."], [" a dull film."])


@pytest.fixture(scope="module")
def engine(tiny_base):
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_base)
    model = load_causal_lm(tiny_base, tokenizer=tok)
    # Every alternative may be asked for, so the soft labels can be compared exactly.
    return Engine(model, tok, "tiny", max_top_logprobs=10**4)


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
    ("/completions", {"prompt": "x", "stream": True}, 400, "stream"),
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
