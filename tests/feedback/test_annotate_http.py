"""Every endpoint of the annotation app through Flask's test client: authentication, CSRF,
escaping of untrusted model text, left/right mapping, progress, admin-only stats, the JSON API."""

from __future__ import annotations

import random
import re

import pytest

pytest.importorskip("flask")

from alignkit.feedback.annotate.app import create_app  # noqa: E402
from alignkit.data.store import PreferenceStore  # noqa: E402

XSS = "<script>alert(1)</script>"


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "prefs.db"
    with PreferenceStore(path) as s:
        s.add_pair_from_texts("Greet the user", XSS, "Hello! <b>How</b> can I help?")
        s.add_pair_from_texts("Name a colour", "Blue", "Seven")
        s.add_pair_from_texts("2 + 2 = ?", "4", "5")
    return path


@pytest.fixture
def tokens(db):
    with PreferenceStore(db) as s:
        return {"admin": s.add_annotator("admin", admin=True), "bob": s.add_annotator("bob")}


@pytest.fixture
def app(db, tokens):
    app = create_app(db, secret_key="test-secret")
    app.config["TESTING"] = True
    return app


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _login(client, token):
    csrf = _csrf(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"token": token, "csrf_token": csrf})


@pytest.fixture
def bob(app, tokens):
    client = app.test_client()
    assert _login(client, tokens["bob"]).status_code == 303
    return client


def _labels(db):
    with PreferenceStore(db) as s:
        return s.comparisons(source="human")


def test_pages_and_api_refuse_anyone_without_a_token(app):
    client = app.test_client()
    for path in ("/", "/stats"):
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    assert (
        client.post("/label", data={"pair_id": 1, "choice": "left"}).status_code == 400
    )  # no CSRF
    for method, path in [
        ("get", "/api/next"),
        ("post", "/api/label"),
        ("get", "/api/progress"),
        ("get", "/api/stats"),
    ]:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic x"}):
            r = getattr(client, method)(path, headers=headers)
            assert r.status_code == 401 and "error" in r.get_json()
            assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_login(app, tokens):
    client = app.test_client()
    page = client.get("/login")
    assert page.status_code == 200 and 'name="token"' in page.get_data(as_text=True)
    csrf = _csrf(page.get_data(as_text=True))
    assert client.post("/login", data={"token": tokens["bob"]}).status_code == 400
    assert (
        client.post("/login", data={"token": tokens["bob"], "csrf_token": "forged"}).status_code
        == 400
    )
    wrong = client.post("/login", data={"token": "guess", "csrf_token": csrf})
    assert wrong.status_code == 401 and "Unknown access token" in wrong.get_data(as_text=True)
    ok = client.post("/login", data={"token": tokens["bob"], "csrf_token": csrf})
    assert ok.status_code == 303 and ok.headers["Location"].endswith("/")
    cookie = ok.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200 and 'id="who">bob<' in page.get_data(as_text=True)


def test_model_text_is_escaped(bob):
    r = bob.get("/", follow_redirects=True)
    html = r.get_data(as_text=True)
    assert "Greet the user" in html  # the first pair holds the script
    assert XSS not in html and "<b>How</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;How&lt;/b&gt;" in html
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_label_form_needs_csrf(bob, db):
    html = bob.get("/", follow_redirects=True).get_data(as_text=True)
    pair_id = re.search(r'name="pair_id" id="pair-id" value="(\d+)"', html).group(1)
    for data in ({}, {"csrf_token": "forged"}):
        r = bob.post("/label", data={"pair_id": pair_id, "choice": "left"} | data)
        assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)
    assert _labels(db) == []
    assert bob.post("/logout").status_code == 400
    assert bob.get("/", follow_redirects=True).status_code == 200  # still logged in


def test_labelling_every_pair_through_the_form(bob, db):
    random.seed(3)
    seen = []
    for n, choice in enumerate(["left", "right", "tie"]):
        html = bob.get("/", follow_redirects=True).get_data(as_text=True)
        assert (
            f'<strong id="n-labelled">{n}</strong> labelled / <span id="n-total">3</span>' in html
        )
        pair_id = int(re.search(r'name="pair_id" id="pair-id" value="(\d+)"', html).group(1))
        left = re.search(r'<div class="text" id="left">(.*?)</div>', html, re.S).group(1)
        seen.append((pair_id, left))
        r = bob.post(
            "/label",
            data={
                "pair_id": pair_id,
                "choice": choice,
                "csrf_token": _csrf(html),
                "comment": "ok" if n == 0 else "",
            },
        )
        assert r.status_code == 303
    assert sorted(p for p, _ in seen) == [1, 2, 3]
    done = bob.get("/", follow_redirects=True).get_data(as_text=True)
    assert 'id="done"' in done and '<strong id="n-labelled">3</strong>' in done
    rows = _labels(db)
    assert [r["pair_id"] for r in rows] == [p for p, _ in seen]
    for row, (_, left), choice in zip(rows, seen, ["left", "right", "tie"], strict=True):
        shown = row["response_a"] if row["shown_left"] == "a" else row["response_b"]
        assert left.replace("&lt;", "<").replace("&gt;", ">") == shown
        other = "b" if row["shown_left"] == "a" else "a"
        assert row["label"] == {"left": row["shown_left"], "right": other, "tie": "tie"}[choice]
    assert [r["comment"] for r in rows] == ["ok", None, None]


def test_skip_and_bad_submissions(bob, db):
    html = bob.get("/", follow_redirects=True).get_data(as_text=True)
    csrf = _csrf(html)
    first = int(re.search(r'value="(\d+)"', html.split('name="pair_id"')[1]).group(1))
    assert (
        bob.post(
            "/label", data={"pair_id": first, "choice": "maybe", "csrf_token": csrf}
        ).status_code
        == 400
    )
    assert (
        bob.post("/label", data={"pair_id": "x", "choice": "left", "csrf_token": csrf}).status_code
        == 400
    )
    other = 3 if first != 3 else 2
    r = bob.post("/label", data={"pair_id": other, "choice": "left", "csrf_token": csrf})
    assert r.status_code == 409 and "not assigned" in r.get_data(as_text=True)
    assert (
        bob.post(
            "/label", data={"pair_id": first, "choice": "skip", "csrf_token": csrf}
        ).status_code
        == 303
    )
    html = bob.get("/", follow_redirects=True).get_data(as_text=True)
    assert f'name="pair_id" id="pair-id" value="{first}"' not in html
    assert 'id="n-total">2<' in html  # the skipped pair is no longer available to bob
    assert _labels(db) == []


def test_stats_are_for_admins(app, bob, tokens, db):
    with PreferenceStore(db) as s:
        s.add_comparison(1, "a", source="human", annotator="carol")
        s.add_comparison(1, "a", source="human", annotator="dave")
        s.add_comparison(1, "b", source="ai", annotator="judge-v1")
    assert bob.get("/stats").status_code == 403
    admin = app.test_client()
    _login(admin, tokens["admin"])
    html = admin.get("/stats").get_data(as_text=True)
    assert '<td>carol</td><td>human</td><td class="num">1</td>' in html
    assert "1 pairs labelled by two or more people" in html and "percent agreement 100.0%" in html
    assert '<td>judge-v1</td><td>ai</td><td class="num">2</td><td class="num">0.0%</td>' in html
    assert 'href="/stats"' in html
    assert 'href="/stats"' not in bob.get("/", follow_redirects=True).get_data(as_text=True)


def test_logout(bob):
    csrf = _csrf(bob.get("/", follow_redirects=True).get_data(as_text=True))
    assert bob.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert bob.get("/").status_code == 302


def test_json_api(app, tokens, db):
    client = app.test_client()
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    nxt = client.get("/api/next", headers=bob).get_json()
    assert nxt["prompt"] == "Greet the user" and {nxt["left"], nxt["right"]} == {
        XSS,
        "Hello! <b>How</b> can I help?",
    }
    assert nxt["progress"] == {"labelled": 0, "skipped": 0, "remaining": 3, "total": 3}
    # A second call is a second tab or worker: another pair, both now reserved for bob.
    other = client.get("/api/next", headers=bob).get_json()
    assert other["pair_id"] not in (None, nxt["pair_id"]) and other["progress"]["remaining"] == 3
    assert client.post("/api/label", headers=bob, data="nope").status_code == 400
    r = client.post(
        "/api/label",
        headers=bob,
        json={"pair_id": nxt["pair_id"], "choice": "right", "comment": "more helpful"},
    )
    assert r.status_code == 200 and isinstance(r.get_json()["comparison_id"], int)
    [row] = _labels(db)
    right = row["response_b"] if row["shown_left"] == "a" else row["response_a"]
    assert right == nxt["right"] and row["annotator"] == "bob" and row["comment"] == "more helpful"
    assert client.get("/api/progress", headers=bob).get_json()["labelled"] == 1
    assert client.get("/api/stats", headers=bob).status_code == 403
    assert client.get("/api/stats", headers=admin).get_json()["labels_per_annotator"] == [
        {"annotator": "bob", "source": "human", "labels": 1}
    ]
    # The API never trusts cookies: a logged-in browser session without a bearer token is refused.
    _login(client, tokens["bob"])
    assert client.get("/api/next").status_code == 401
    # Labelling until done, then pair_id is null.
    while (nxt := client.get("/api/next", headers=admin).get_json())["pair_id"] is not None:
        client.post("/api/label", headers=admin, json={"pair_id": nxt["pair_id"], "choice": "tie"})
    # Of three pairs bob labelled one and still holds the other: admin gets the third only.
    assert nxt["progress"]["labelled"] == 1


def test_unknown_pages_need_login_too(app):
    assert app.test_client().get("/nothing-here").status_code == 302


# -- several tabs, answering twice, revoked sessions, malformed input ----------------------------


def _pair_page(client, path="/"):
    """GET ``path``, following redirects: (pair id in the address, the page's html)."""
    r = client.get(path, follow_redirects=True)
    assert r.status_code == 200
    match = re.fullmatch(r"/pair/(\d+)", r.request.path)
    return (int(match.group(1)) if match else None), r.get_data(as_text=True)


def test_a_pair_has_its_own_page_so_reload_keeps_it_and_a_new_tab_gets_another(bob, db):
    first = bob.get("/")
    assert first.status_code == 303 and re.fullmatch(r"/pair/\d+", first.headers["Location"])
    tab1, html1 = _pair_page(bob, first.headers["Location"])
    assert _pair_page(bob, f"/pair/{tab1}") == (tab1, html1)  # a reload: the same pair, same sides
    tab2, html2 = _pair_page(bob)  # a second tab
    assert tab2 not in (None, tab1) and f'value="{tab2}"' in html2
    r = bob.post("/label", data={"pair_id": tab1, "choice": "left", "csrf_token": _csrf(html1)})
    assert r.status_code == 303
    # An answered pair's page (e.g. its other tab reloaded) moves on to a pair still open.
    assert _pair_page(bob, f"/pair/{tab1}")[0] not in (None, tab1)
    # Pairs that were never this person's, or ids past SQLite's range, are no page of theirs.
    for path in ("/pair/0", "/pair/999", f"/pair/{2**64}"):
        r = bob.get(path)
        assert (r.status_code, r.headers["Location"]) == (303, "/"), path
    for path in ("/pair/-1", "/pair/1.5", "/pair/x"):
        assert bob.get(path).status_code == 404, path


def test_answering_a_pair_twice_is_never_silently_dropped(app, bob, tokens, db):
    api = app.test_client()
    auth = {"Authorization": f"Bearer {tokens['admin']}"}
    pid = api.get("/api/next", headers=auth).get_json()["pair_id"]
    first = api.post("/api/label", headers=auth, json={"pair_id": pid, "choice": "left"})
    cid = first.get_json()["comparison_id"]
    assert first.status_code == 200 and isinstance(cid, int)
    again = api.post("/api/label", headers=auth, json={"pair_id": pid, "choice": "left"})
    assert (again.status_code, again.get_json()) == (200, {"comparison_id": cid})
    for choice in ("right", "tie", "skip"):
        r = api.post("/api/label", headers=auth, json={"pair_id": pid, "choice": choice})
        assert r.status_code == 409
        body = r.get_json()
        assert (body["comparison_id"], body["choice"]) == (cid, "left")
        assert f"already labelled it 'left' (comparison {cid})" in body["error"]
    skipped = api.get("/api/next", headers=auth).get_json()["pair_id"]
    r = api.post("/api/label", headers=auth, json={"pair_id": skipped, "choice": "skip"})
    assert (r.status_code, r.get_json()) == (200, {"comparison_id": None, "skipped": True})
    # The form says so too, on the page.
    pid, html = _pair_page(bob)
    data = {"pair_id": pid, "choice": "tie", "csrf_token": _csrf(html)}
    assert bob.post("/label", data=data).status_code == 303
    assert bob.post("/label", data=data).status_code == 303  # a double click: the same label
    r = bob.post("/label", data=data | {"choice": "right"})
    assert r.status_code == 409 and "already labelled it &#39;tie&#39;" in r.get_data(as_text=True)
    assert [(r["annotator"], r["label"]) for r in _labels(db)] == [
        ("admin", _labels(db)[0]["shown_left"]),
        ("bob", "tie"),
    ]


def test_resetting_a_token_ends_the_sessions_logged_in_with_it(app, bob, tokens, db):
    pid, html = _pair_page(bob)
    other_browser = app.test_client()
    _login(other_browser, tokens["bob"])
    assert _pair_page(other_browser)[0] is not None
    with PreferenceStore(db) as s:
        new_token = s.reset_token("bob")
    # A label sent from a page that was open before the reset is refused, not stored...
    r = bob.post("/label", data={"pair_id": pid, "choice": "left", "csrf_token": _csrf(html)})
    assert r.status_code == 401 and "session has ended" in r.get_data(as_text=True)
    assert _labels(db) == []
    assert bob.get("/").headers["Location"].endswith("/login")  # that session is gone
    # Pages send the person back to the login page, which says why.
    r = other_browser.get(f"/pair/{pid}")
    assert r.status_code == 302 and r.headers["Location"].endswith("/login?ended=1")
    assert other_browser.get("/").headers["Location"].endswith("/login")  # gone too
    page = bob.get("/login?ended=1").get_data(as_text=True)
    assert 'id="session-ended"' in page and "access token was reset" in page
    # The API never had sessions: the old token is simply unknown now.
    old = app.test_client().get("/api/next", headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert old.status_code == 401 and old.get_json() == {"error": "unknown access token"}
    # Logging in with the new token works, and that session holds.
    assert _login(bob, new_token).status_code == 303
    assert _pair_page(bob)[0] is not None and bob.get("/").status_code == 303


def test_malformed_pair_ids_and_comments_are_400_naming_the_field(app, bob, tokens, db):
    api = app.test_client()
    auth = {"Authorization": f"Bearer {tokens['admin']}", "Content-Type": "application/json"}
    pid = api.get("/api/next", headers=auth).get_json()["pair_id"]
    assert pid == 1
    # 1.9 and true used to be taken as pair 1, and 1e23 or 2**63 were a 500 (SQLite overflow).
    for raw in ("1e23", "1.9", "1.0", "true", "false", "null", "0", "-1", str(2**63), "[1]",
                '{"id": 1}', '"1.0"', '" 1"', '"1_0"', '"\\u0661"', "9" * 30):
        r = api.post("/api/label", headers=auth, data=f'{{"pair_id": {raw}, "choice": "left"}}')
        assert r.status_code == 400, raw
        assert r.get_json() == {"error": "pair_id must be a whole number from 1 to 2**63 - 1"}
    r = api.post(
        "/api/label", headers=auth, data='{"pair_id": 1, "choice": "left", "comment": "a\\ud800"}'
    )
    assert r.status_code == 400 and "comment is not valid Unicode text" in r.get_json()["error"]
    for body in ('{"pair_id": 1, "choice": ["left"]}', '{"pair_id": 1, "choice": "LEFT"}'):
        r = api.post("/api/label", headers=auth, data=body)
        assert r.status_code == 400 and r.get_json()["error"].startswith("choice must be one of")
    r = api.post("/api/label", headers=auth, data="[" * 50_000)  # past Python's recursion limit
    assert r.status_code == 400 and r.get_json() == {"error": "expected a JSON object body"}
    assert _labels(db) == []  # nothing above labelled pair 1 as anything
    r = api.post("/api/label", headers=auth, data='{"pair_id": "1", "choice": "left"}')
    assert r.status_code == 200 and isinstance(r.get_json()["comparison_id"], int)
    # The form: only ASCII digits.
    form_pid, html = _pair_page(bob)
    for bad in ("1.9", " 1", "1_0", "\u0661", "", "9" * 30):
        r = bob.post("/label", data={"pair_id": bad, "choice": "left", "csrf_token": _csrf(html)})
        assert r.status_code == 400 and "pair_id must be a whole number" in r.get_data(as_text=True)
    assert len(_labels(db)) == 1


def test_odd_tokens_and_csrf_values_are_refused_not_a_500(app, tokens):
    client = app.test_client()
    csrf = _csrf(client.get("/login").get_data(as_text=True))
    form = "application/x-www-form-urlencoded"
    # %ED%A0%80 is a surrogate encoded as UTF-8 (invalid); non-ASCII CSRF values broke
    # hmac.compare_digest on str.
    for body in (f"token=%ED%A0%80&csrf_token={csrf}", f"token=\u00e9&csrf_token={csrf}",
                 "token=x&csrf_token=%C3%A9", "token=x&csrf_token=%FF"):
        r = client.post("/login", data=body.encode(), content_type=form)
        assert r.status_code in (400, 401), body
    for header in ("Bearer \u00e9\u00ff", "Bearer " + "x" * 5000, "bearer  ", "Bearer a b"):
        r = client.get("/api/next", headers={"Authorization": header})
        assert r.status_code == 401 and "error" in r.get_json()


N_THREADS, LABELS_PER_THREAD = 8, 50


def test_one_token_in_eight_threads_gets_every_label_stored(tmp_path):
    """The issue's report: 8 threads on one token sent 400 labels and 110 were stored (the
    rest answered 200 {"comparison_id": null}). Every thread must get its own pairs."""
    import http.client
    import json as jsonlib
    import threading

    from werkzeug.serving import make_server

    db = tmp_path / "tabs.db"
    with PreferenceStore(db) as s:
        with s.transaction():
            for i in range(N_THREADS * LABELS_PER_THREAD):
                s.add_pair_from_texts(f"prompt {i}", f"first {i}", f"second {i}")
        token = s.add_annotator("ann")
    httpd = make_server("127.0.0.1", 0, create_app(db, secret_key="t"), threaded=True)
    server = threading.Thread(target=httpd.serve_forever, daemon=True)
    server.start()
    barrier = threading.Barrier(N_THREADS)
    results: list[list[tuple[int, int, object]]] = [[] for _ in range(N_THREADS)]
    errors: list[BaseException] = []

    def tab(n: int) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", httpd.server_port, timeout=60)
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

            def call(method, path, body=None):
                conn.request(method, path, body=body, headers=auth)
                r = conn.getresponse()
                return r.status, jsonlib.loads(r.read())

            barrier.wait()
            for i in range(LABELS_PER_THREAD):
                status, nxt = call("GET", "/api/next")
                assert status == 200 and nxt["pair_id"] is not None
                # Choices differ between threads: a duplicate could not pass as idempotent.
                choice = ("left", "right", "tie")[(n + i) % 3]
                body = jsonlib.dumps({"pair_id": nxt["pair_id"], "choice": choice})
                status, answer = call("POST", "/api/label", body)
                results[n].append((nxt["pair_id"], status, answer.get("comparison_id")))
            conn.close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=tab, args=(n,)) for n in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    httpd.shutdown()
    server.join(timeout=10)
    assert not errors, errors
    answers = [a for per_thread in results for a in per_thread]
    assert len(answers) == N_THREADS * LABELS_PER_THREAD
    assert all(status == 200 and isinstance(cid, int) for _, status, cid in answers), [
        a for a in answers if a[1] != 200 or a[2] is None
    ][:5]
    assert len({pid for pid, _, _ in answers}) == N_THREADS * LABELS_PER_THREAD  # no pair twice
    with PreferenceStore(db) as s:
        assert s.count("comparisons") == N_THREADS * LABELS_PER_THREAD
        assert sorted(r["id"] for r in s.comparisons()) == sorted(cid for _, _, cid in answers)
        assert s.progress("ann") == {"labelled": 400, "skipped": 0, "remaining": 0, "total": 400}


def test_a_browsers_side_requests_before_login_keep_the_login_forms_csrf_token(app, tokens):
    """A browser fetches the favicon (or any page) between showing the login form and posting
    it: an anonymous session must keep the form's CSRF token (only an ended login is cleared)."""
    client = app.test_client()
    csrf = _csrf(client.get("/login").get_data(as_text=True))
    assert client.get("/favicon.ico").status_code in (302, 404)
    assert client.get("/").status_code == 302
    r = client.post("/login", data={"token": tokens["bob"], "csrf_token": csrf})
    assert r.status_code == 303, r.get_data(as_text=True)
