"""Property-based fuzzing of the annotation app and the store's command lines.

Every HTTP endpoint (every rule in the app's URL map: a new route fails
``test_every_route_is_fuzzed`` until it is listed here) gets arbitrary JSON bodies, form fields,
query strings, headers and methods -- non-ASCII text, lone surrogates, huge and fractional
numbers, wrong types, bytes that are not UTF-8 -- from an anonymous visitor, a logged-in person,
an admin, and bearer tokens good and bad. The app runs with ``TESTING`` on, so an unhandled
exception is raised here with its traceback instead of becoming a 500; a 5xx status fails too.

The store CLI and ``alignkit annotate``'s argument parsing get arbitrary argument lists: each
ends normally or with exit code 2 and one line on stderr, never an exception.

Examples are bounded (``max_examples``) so that the file runs in well under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flask")

from alignkit.data.store import PreferenceStore  # noqa: E402
from alignkit.feedback import store_cli  # noqa: E402
from alignkit.feedback.annotate import cli as annotate_cli  # noqa: E402
from alignkit.feedback.annotate.app import create_app  # noqa: E402

N_PAIRS = 300
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # no .hypothesis folder in the repository
)

# Every route of the app, as a path to request (with a placeholder id where the rule has one).
ROUTES = {
    "/login": "annotate.login",
    "/logout": "annotate.logout",
    "/": "annotate.index",
    "/pair/1": "annotate.pair",
    "/label": "annotate.label",
    "/stats": "annotate.stats",
    "/api/next": "annotate.api_next",
    "/api/label": "annotate.api_label",
    "/api/progress": "annotate.api_progress",
    "/api/stats": "annotate.api_stats",
    "/static/style.css": "static",
}
METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")


# -- strategies ----------------------------------------------------------------------------------

# Any text, with lone surrogates (what JSON's "\ud800" decodes to) and troublemakers made likely.
chars = st.one_of(
    st.characters(exclude_categories=()),
    st.characters(categories=["Cs"]),
    st.sampled_from("\x00\n\r\t\"'<>&\\%;=/ é€😀\u202e\ufeff"),
)
texts = st.text(chars, max_size=40)
# What survives HTTP headers: WSGI hands header bytes to the app as latin-1 text.
header_texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)
numbers = st.one_of(
    st.integers(min_value=-3, max_value=N_PAIRS + 3),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1.9, 1.0, 1e23, -0.0, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
# Placeholders, replaced when a test runs: the pair the app just handed out (so that the store's
# submit path is reached, not only "not assigned"), the session's CSRF token, the person's token.
NEXT, CSRF, TOKEN = "<next pair>", "<csrf>", "<token>"
SIDES = ["left", "right", "tie", "skip"]
label_objects = st.fixed_dictionaries(
    {},
    optional={
        "pair_id": st.one_of(
            st.just(NEXT), numbers, json_values, st.from_regex(r"\A[0-9]{1,25}\Z")
        ),
        "choice": st.one_of(st.sampled_from(SIDES), json_values),
        "comment": st.one_of(texts, json_values, st.text(chars, min_size=1990, max_size=2100)),
    },
).flatmap(lambda d: st.dictionaries(texts, json_values, max_size=3).map(lambda extra: extra | d))


def _json_bytes(value) -> bytes:
    # ensure_ascii: lone surrogates travel as "\udXXX" escapes, as a client would send them.
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


json_bodies = st.one_of(
    label_objects.map(_json_bytes),
    json_values.map(_json_bytes),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[" * 5000, b"{}" * 10, b'{"pair_id": 1e999999}']),
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
        ]
    ),
    header_texts,
)


def _urlencode(fields: list[tuple[str, str]]) -> bytes:
    # Surrogates become the bytes Python would write with surrogatepass: invalid UTF-8 on the wire.
    def enc(text: str) -> str:
        return quote_from_bytes(text.encode("utf-8", "surrogatepass"))

    return "&".join(f"{enc(k)}={enc(v)}" for k, v in fields).encode()


form_values = st.one_of(texts, numbers.map(str), st.sampled_from(SIDES))
form_fields = st.tuples(
    st.fixed_dictionaries(
        {},
        optional={
            "pair_id": st.one_of(st.just(NEXT), form_values),
            "choice": st.one_of(st.sampled_from(SIDES), form_values),
            "comment": form_values,
            "token": st.one_of(st.just(TOKEN), form_values),
            "csrf_token": st.one_of(st.just(CSRF), form_values),
        },
    ),
    st.lists(st.tuples(texts, form_values), max_size=3),
).map(lambda t: [*t[0].items(), *t[1]])
query_strings = st.one_of(
    st.binary(max_size=60).map(quote_from_bytes),
    form_fields.map(lambda fields: _urlencode(fields).decode()),
    st.just("ended=1"),
)
who = st.sampled_from(["nobody", "bob", "admin", "bearer-bob", "bearer-admin", "bearer-junk"])


# -- the app under fuzz --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "prefs.db"
    with PreferenceStore(db) as s:
        with s.transaction():
            for i in range(N_PAIRS):
                s.add_pair_from_texts(f"prompt {i} <b>", f"left {i} \u00e9", f"right {i} 😀")
        tokens = {"bob": s.add_annotator("bob"), "admin": s.add_annotator("admin", admin=True)}
    app = create_app(db, secret_key="fuzz")
    app.config["TESTING"] = True  # an unhandled exception is raised into the test, not a 500
    sessions = {}
    for name, token in tokens.items():
        client = app.test_client()
        page = client.get("/login").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        assert client.post("/login", data={"token": token, "csrf_token": csrf}).status_code == 303
        html = client.get("/", follow_redirects=True).get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        sessions[name] = (client.get_cookie("alignkit_session").value, csrf)
    return app, tokens, sessions


def _client(world, identity: str, headers: dict):
    """A fresh test client acting as ``identity``; returns it and the CSRF token to use."""
    app, tokens, sessions = world
    client = app.test_client()
    csrf = "no-csrf"
    if identity in sessions:  # a logged-in browser (a fresh copy: a fuzzed /logout stays local)
        cookie, csrf = sessions[identity]
        client.set_cookie("alignkit_session", cookie)
    elif identity.startswith("bearer-"):
        name = identity.removeprefix("bearer-")
        headers.setdefault("Authorization", f"Bearer {tokens.get(name, 'junk-token')}")
    return client, csrf


def _check(response, path: str) -> None:
    body = response.get_data()
    assert response.status_code < 500, (response.status_code, path, body[:300])
    assert b"Traceback" not in body
    api_error = path.startswith("/api/") and response.status_code >= 400
    if api_error and response.status_code != 404 and response.request.method != "HEAD":
        assert "error" in response.get_json(), body[:300]


def test_every_route_is_fuzzed(world):
    app = world[0]
    assert {rule.endpoint for rule in app.url_map.iter_rules()} == set(ROUTES.values())


def _next_pair(client, headers: dict) -> int:
    if "Authorization" in headers:
        pair_id = client.get("/api/next", headers=headers).get_json()["pair_id"]
    else:
        location = client.get("/").headers.get("Location", "")
        pair_id = int(location.rpartition("/")[2]) if location.startswith("/pair/") else None
    return 1 if pair_id is None else pair_id


@FUZZ
@given(body=label_objects, identity=st.sampled_from(["bearer-bob", "bearer-admin"]))
def test_fuzz_api_label_fields(world, body, identity):
    headers = {"Content-Type": "application/json"}
    client, _ = _client(world, identity, headers)
    if body.get("pair_id") == NEXT:
        body["pair_id"] = _next_pair(client, headers)
    _check(client.post("/api/label", data=_json_bytes(body), headers=headers), "/api/label")


@FUZZ
@given(body=json_bodies, content_type=content_types, identity=who)
def test_fuzz_api_label_any_body(world, body, content_type, identity):
    headers = {"Content-Type": content_type}
    client, _ = _client(world, identity, headers)
    _check(client.post("/api/label", data=body, headers=headers), "/api/label")


@FUZZ
@given(
    path=st.sampled_from(["/label", "/login", "/logout"]),
    fields=form_fields,
    identity=st.sampled_from(["bob", "admin", "nobody", "bearer-bob"]),
)
def test_fuzz_form_posts(world, path, fields, identity):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    client, csrf = _client(world, identity, headers)
    token = world[1]["bob"]
    placeholders = {CSRF: csrf, TOKEN: token}
    fields = [
        (k, str(_next_pair(client, {})) if v == NEXT else placeholders.get(v, v))
        for k, v in fields
    ]
    _check(client.post(path, data=_urlencode(fields), headers=headers), path)


@FUZZ
@given(
    path=st.sampled_from(sorted(ROUTES)),
    method=st.sampled_from(METHODS),
    query=query_strings,
    extra_headers=st.dictionaries(
        st.sampled_from(["Authorization", "Cookie", "Accept", "X-Forwarded-For", "Content-Type"]),
        header_texts,
        max_size=3,
    ),
    body=st.one_of(json_bodies, st.binary(max_size=80)),
    identity=who,
)
def test_fuzz_every_route_method_query_and_headers(
    world, path, method, query, extra_headers, body, identity
):
    headers = dict(extra_headers)
    client, _ = _client(world, identity, headers)
    data = None if method in ("GET", "HEAD", "OPTIONS") else body
    r = client.open(path, method=method, query_string=query, headers=headers, data=data)
    _check(r, path)


@FUZZ
@given(
    segment=st.one_of(
        st.integers(min_value=-5, max_value=2**70).map(str),
        st.binary(min_size=1, max_size=30).map(lambda b: quote_from_bytes(b, safe="")),
    ),
    prefix=st.sampled_from(["/pair/", "/api/", "/static/", "/"]),
    identity=who,
)
def test_fuzz_unknown_and_parameterised_paths(world, segment, prefix, identity):
    headers: dict = {}
    client, _ = _client(world, identity, headers)
    _check(client.get(prefix + segment, headers=headers), prefix + segment)


# -- the command lines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the CLI fuzz may name (all inside one temporary folder: nothing lands elsewhere)."""
    root = tmp_path_factory.mktemp("cli")
    with PreferenceStore(root / "store.db") as s:
        s.add_pair_from_texts("q", "x", "y")
    (root / "notes.txt").write_text("not a database\n")
    (root / "folder").mkdir()
    (root / "pairs.jsonl").write_text('{"prompt": "q", "response_a": "x", "response_b": "z"}\n')
    (root / "prefs.jsonl").write_text('{"prompt": "q", "chosen": "x", "rejected": "y"}\n')
    (root / "surrogate.jsonl").write_text(
        '{"prompt": "\\ud800", "response_a": "x", "response_b": "y"}\n'
    )
    (root / "bad.jsonl").write_bytes(b'{"prompt": "q"}\n\xff\xfe\n')
    return root


def _paths(root: Path):
    fixed = ["store.db", "notes.txt", "folder", "pairs.jsonl", "prefs.jsonl", "surrogate.jsonl",
             "bad.jsonl", "missing.db", "missing/sub/x.jsonl", "folder/new.db"]
    # File names may hold anything a command line can carry, surrogate escapes included.
    names = st.text(chars.filter(lambda c: c not in "/\x00"), min_size=1, max_size=12)
    return st.one_of(st.sampled_from(fixed), names).map(lambda name: str(root / name))


# Each action's own options: argument lists built from them mostly get past argparse, so the
# fuzz reaches the store, not only argparse's usage errors.
STORE_ACTIONS = {
    ("import",): ["--pairs", "--preferences", "--source", "--annotator"],
    ("export",): ["--out", "--format", "--source", "--annotator", "--min-agreement", "--ties"],
    ("stats",): [],
    ("annotator", "add"): ["--admin"],
    ("annotator", "reset-token"): [],
    ("annotator", "list"): [],
}


@st.composite
def _store_argv(draw, root: Path):
    paths = _paths(root)
    values = {
        "--pairs": paths,
        "--preferences": paths,
        "--out": paths,
        "--min-agreement": st.one_of(
            st.sampled_from(["5", "-0.1", "nan", "inf", "1e999", "0.5", "1", "-0", "0x1", ""]),
            st.floats().map(str),
            texts,
        ),
        "--format": st.sampled_from(["preference", "unpaired", "csv"]),
        "--ties": st.sampled_from(["drop", "split", "keep"]),
        "--source": st.sampled_from(["human", "ai", "simulated", "crowd"]),
    }
    action = draw(st.sampled_from(sorted(STORE_ACTIONS)))
    argv = list(action)
    if action[0] == "annotator" and action[1] != "list":
        argv.append(draw(st.one_of(st.sampled_from(["ann", "bob", " ", "-x"]), texts)))
    if draw(st.integers(0, 9)):  # usually a --store
        argv += ["--store", draw(paths)]
    flags = STORE_ACTIONS[action] + ["--nope"]
    for flag in draw(st.lists(st.sampled_from(flags), max_size=4, unique=True)):
        argv.append(flag)
        if flag != "--admin":
            argv.append(draw(values.get(flag, texts)))
    return argv


def _run_cli(module, argv, *, run: bool) -> tuple[object, str]:
    parser = argparse.ArgumentParser(prog="alignkit x")
    module.add_arguments(parser)
    err, out = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            args = parser.parse_args(argv)
            if run:
                module.run(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fuzz_store_cli_arguments(files, data):
    argv = data.draw(_store_argv(files), label="argv")
    assert not any(a in ("-h", "--help") for a in argv)
    code, err = _run_cli(store_cli, argv, run=True)
    assert code in (None, 0, 2), (argv, code, err)
    if code == 2:
        # argparse's usage errors ("alignkit x import: error: ...") or ours, in one line.
        assert "Traceback" not in err and re.search(r"^alignkit [^:]*: error: ", err, re.M)
        if "alignkit store: error: " in err:
            assert len(err.strip().splitlines()) == 1, (argv, err)


@settings(FUZZ, max_examples=100)
@given(
    flag=st.sampled_from(["--port", "--labels-per-pair", "--assignment-ttl", "--host"]),
    value=st.one_of(texts, st.integers().map(str), st.floats().map(str)),
)
def test_fuzz_annotate_cli_arguments(files, flag, value):
    code, err = _run_cli(
        annotate_cli, ["--store", str(files / "store.db"), flag, value], run=False
    )
    assert code in (None, 2), (flag, value, code, err)
    if code == 2:
        assert f"argument {flag}" in err or "expected one argument" in err, err
    elif flag == "--port":
        assert 0 <= int(value) <= 65535
