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
    page = client.get("/")
    assert page.status_code == 200 and 'id="who">bob<' in page.get_data(as_text=True)


def test_model_text_is_escaped(bob):
    r = bob.get("/")
    html = r.get_data(as_text=True)
    assert "Greet the user" in html  # the first pair holds the script
    assert XSS not in html and "<b>How</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;How&lt;/b&gt;" in html
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_label_form_needs_csrf(bob, db):
    html = bob.get("/").get_data(as_text=True)
    pair_id = re.search(r'name="pair_id" id="pair-id" value="(\d+)"', html).group(1)
    for data in ({}, {"csrf_token": "forged"}):
        r = bob.post("/label", data={"pair_id": pair_id, "choice": "left"} | data)
        assert r.status_code == 400 and "CSRF" in r.get_data(as_text=True)
    assert _labels(db) == []
    assert bob.post("/logout").status_code == 400
    assert bob.get("/").status_code == 200  # still logged in


def test_labelling_every_pair_through_the_form(bob, db):
    random.seed(3)
    seen = []
    for n, choice in enumerate(["left", "right", "tie"]):
        html = bob.get("/").get_data(as_text=True)
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
    done = bob.get("/").get_data(as_text=True)
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
    html = bob.get("/").get_data(as_text=True)
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
    html = bob.get("/").get_data(as_text=True)
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
    assert 'href="/stats"' in html and 'href="/stats"' not in bob.get("/").get_data(as_text=True)


def test_logout(bob):
    csrf = _csrf(bob.get("/").get_data(as_text=True))
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
    assert client.get("/api/next", headers=bob).get_json()["pair_id"] == nxt["pair_id"]
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
    assert nxt["progress"]["labelled"] == 2  # bob already holds the one label pair 1 may get


def test_unknown_pages_need_login_too(app):
    assert app.test_client().get("/nothing-here").status_code == 302
