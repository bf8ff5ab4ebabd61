"""The annotation web app (Flask): people compare two responses to a prompt and pick the better.

Pages (signed session cookie after logging in with an access token; every form POST carries a
CSRF token):

  GET  /login, POST /login      log in with the token from ``alignkit store annotator add``
  POST /logout
  GET  /                        reserves the next pair and redirects to its page (or: all done)
  GET  /pair/<id>               that pair: prompt, two responses side by side, progress
  POST /label                   answer it: choice=left|right|tie|skip, optional comment
  GET  /stats                   labels per annotator and agreement (admins only)

JSON API (``Authorization: Bearer TOKEN``; no cookies, hence no CSRF):

  GET  /api/next  ->  {pair_id, prompt, left, right, progress}  (pair_id null when done)
  POST /api/label     {pair_id, choice, [comment]}  ->  {comparison_id}  (a skip: {comparison_id:
                      null, skipped: true})
  GET  /api/progress, GET /api/stats (admins only)

One person may label in several tabs (or API workers) at once: every GET / or /api/next hands
out a different pair while unreserved ones remain (see ``PreferenceStore.next_pair_for``), and a
pair's own address lets a tab reload it. Answering a pair twice never drops a label silently:
the same answer again is idempotent (the first comparison_id), a different one is 409 Conflict
naming the first (JSON: ``{error, comparison_id, choice}``).

A login session remembers a fingerprint of the annotator's token
(``PreferenceStore.session_key``), checked on every request: ``alignkit store annotator
reset-token`` logs out every browser logged in with the old token.

Which response is shown on the left is random per (pair, annotator) and recorded with the label.
Responses are untrusted model output: templates autoescape, and the Content-Security-Policy
allows no inline script, so escaping mistakes cannot run code either. Malformed input of any kind
is a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import Conflict, HTTPException

from alignkit.data.store import MAX_OPEN, LabelConflict, PreferenceStore, StoreError, is_text

MAX_COMMENT = 2000
SIDES = ("left", "right", "tie", "skip")
# SQLite's INTEGER range: a larger number names no pair, and binding it raises OverflowError.
MAX_ID = 2**63 - 1
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

bp = Blueprint("annotate", __name__)


def create_app(
    store_path: str | Path,
    *,
    secret_key: str | None = None,
    labels_per_pair: int = 1,
    assignment_ttl_s: float = 3600.0,
    max_open: int = MAX_OPEN,
) -> Flask:
    """The app serving the store at ``store_path`` (created/migrated now).

    ``secret_key`` signs session cookies; default ``$ALIGNKIT_SECRET_KEY``, else a random key
    (everyone is logged out when the app restarts). ``max_open``: unanswered pairs one person
    may hold at once (their tabs or API workers).
    """
    PreferenceStore(store_path, labels_per_pair=labels_per_pair).close()
    app = Flask("alignkit.feedback.annotate")
    app.config.update(
        SECRET_KEY=secret_key or os.environ.get("ALIGNKIT_SECRET_KEY") or secrets.token_hex(32),
        SESSION_COOKIE_NAME="alignkit_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        MAX_CONTENT_LENGTH=64 * 1024,
        STORE_PATH=str(store_path),
        LABELS_PER_PAIR=labels_per_pair,
        ASSIGNMENT_TTL_S=assignment_ttl_s,
        MAX_OPEN=max_open,
    )
    app.register_blueprint(bp)
    app.jinja_env.globals["csrf_token"] = _csrf_token
    app.teardown_appcontext(_close_store)
    app.after_request(_security_headers)
    app.register_error_handler(HTTPException, _error)
    return app


# -- request plumbing ---------------------------------------------------------------------------


def _store() -> PreferenceStore:
    # One connection per request: sqlite3 connections must not cross the server's threads.
    if "store" not in g:
        cfg = current_app.config
        g.store = PreferenceStore(
            cfg["STORE_PATH"],
            labels_per_pair=cfg["LABELS_PER_PAIR"],
            assignment_ttl_s=cfg["ASSIGNMENT_TTL_S"],
        )
    return g.store


def _close_store(exc: BaseException | None) -> None:
    store = g.pop("store", None)
    if store is not None:
        store.close()


def _is_api() -> bool:
    return request.path.startswith("/api/")


def _csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _security_headers(response):
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


class _LabelConflict(Conflict):
    """409 for a second, different answer; the API's body also names the first answer."""

    def __init__(self, conflict: LabelConflict):
        super().__init__(str(conflict))
        self.details = {"comparison_id": conflict.comparison_id, "choice": conflict.choice}


def _error(e: HTTPException):
    if _is_api():
        response = jsonify(error=e.description, **getattr(e, "details", {}))
    else:
        response = current_app.make_response(
            render_template("error.html", code=e.code, name=e.name, description=e.description)
        )
    response.status_code = e.code
    if e.code == 401 and _is_api():
        response.headers["WWW-Authenticate"] = 'Bearer realm="alignkit"'
    return response


@bp.before_app_request
def _authenticate():
    """Every endpoint but the login page and static files needs an annotator."""
    g.annotator = None
    if _is_api():
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            abort(401, "an 'Authorization: Bearer TOKEN' header is required")
        g.annotator = _store().annotator_by_token(token.strip())
        if g.annotator is None:
            abort(401, "unknown access token")
        return None
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        # Bytes: compare_digest refuses str with non-ASCII characters (a TypeError, i.e. a 500).
        if not sent or "csrf" not in session or not hmac.compare_digest(
            sent.encode("utf-8", "surrogatepass"), session["csrf"].encode()
        ):
            abort(400, "missing or invalid CSRF token; reload the page and try again")
    if request.endpoint in ("annotate.login", "static"):
        return None
    if "annotator_id" in session:
        store = _store()
        annotator = store.annotator_by_id(session["annotator_id"])
        # The cookie is signed but holds no secret of its own: without this check a session would
        # outlive a reset of the token it was opened with.
        key = None if annotator is None else store.session_key(annotator.id)
        if key is not None and hmac.compare_digest(session.get("key", ""), key):
            g.annotator = annotator
    if g.annotator is None:
        ended = "annotator_id" in session
        if ended:   # a revoked login; an anonymous session keeps its CSRF token for the login form
            session.clear()
        if request.method == "GET":
            return redirect(url_for("annotate.login", **({"ended": 1} if ended else {})))
        if ended:
            abort(401, "your session has ended (your access token was reset); log in again")
        abort(401, "log in first")
    return None


def _require_admin() -> None:
    if not g.annotator.is_admin:
        abort(403, "only admins may see the statistics")


def _next_pair(store: PreferenceStore):
    return store.next_pair_for(g.annotator.name, max_open=current_app.config["MAX_OPEN"])


def _pair_view(store: PreferenceStore, assignment) -> dict:
    view = {
        "pair_id": None,
        "prompt": None,
        "left": None,
        "right": None,
        "progress": store.progress(g.annotator.name),
    }
    if assignment is not None:
        view.update(
            pair_id=assignment.pair_id,
            prompt=assignment.prompt,
            left=assignment.left,
            right=assignment.right,
        )
    return view


def _pair_id(value: object) -> int:
    # int() would take 1.9, True, 1e23 (as a float), " 1", "1_0" and Arabic-Indic digits: only a
    # JSON integer or a string of ASCII digits names a pair.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        abort(400, "pair_id must be a whole number from 1 to 2**63 - 1")
    return value


def _submit(store: PreferenceStore, pair_id: object, choice: object, comment: object) -> int | None:
    if not isinstance(choice, str) or choice not in SIDES:
        abort(400, f"choice must be one of {', '.join(SIDES)}")
    pair_id = _pair_id(pair_id)
    if comment is not None and not isinstance(comment, str):
        abort(400, "comment must be a string")
    if comment is not None and not is_text(comment):
        abort(400, "comment is not valid Unicode text (it holds a lone surrogate)")
    comment = (comment or "").strip()[:MAX_COMMENT] or None
    try:
        return store.submit(g.annotator.name, pair_id, choice, comment)
    except LabelConflict as e:
        raise _LabelConflict(e) from None
    except StoreError as e:
        abort(409, str(e))


# -- pages --------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        store = _store()
        annotator = store.annotator_by_token(request.form.get("token", "").strip())
        if annotator is not None:
            session.clear()  # a fresh session (and CSRF token) for the logged-in person
            session["annotator_id"] = annotator.id
            session["key"] = store.session_key(annotator.id)
            return redirect(url_for("annotate.index"), code=303)
        error = "Unknown access token."
    ended = request.method == "GET" and "ended" in request.args
    return render_template("login.html", error=error, ended=ended), 401 if error else 200


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("annotate.login"), code=303)


@bp.get("/")
def index():
    store = _store()
    assignment = _next_pair(store)
    if assignment is None:
        return render_template("annotate.html", **_pair_view(store, None))
    # The pair gets its own address: reloading the tab shows the same pair again, while GET /
    # (a new tab, or after answering) reserves another one.
    return redirect(url_for("annotate.pair", pair_id=assignment.pair_id), code=303)


@bp.get("/pair/<int:pair_id>")
def pair(pair_id: int):
    store = _store()
    assignment = store.assignment(g.annotator.name, pair_id) if pair_id <= MAX_ID else None
    if assignment is None or assignment.status != "open":
        # Answered (perhaps in another tab) or never handed to this person: on to one that is.
        return redirect(url_for("annotate.index"), code=303)
    return render_template("annotate.html", **_pair_view(store, assignment))


@bp.post("/label")
def label():
    _submit(
        _store(),
        request.form.get("pair_id"),
        request.form.get("choice"),
        request.form.get("comment"),
    )
    return redirect(url_for("annotate.index"), code=303)


@bp.get("/stats")
def stats():
    _require_admin()
    return render_template("stats.html", stats=_store().stats())


# -- JSON API -----------------------------------------------------------------------------------


@bp.get("/api/next")
def api_next():
    store = _store()
    return jsonify(_pair_view(store, _next_pair(store)))


@bp.post("/api/label")
def api_label():
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # "[[[[..." nested past Python's limit; silent= catches ValueError only
        body = None
    if not isinstance(body, dict):
        abort(400, "expected a JSON object body")
    comparison_id = _submit(_store(), body.get("pair_id"), body.get("choice"), body.get("comment"))
    if body["choice"] == "skip":  # say so: a null id must never look like a label gone missing
        return jsonify(comparison_id=None, skipped=True)
    return jsonify(comparison_id=comparison_id)


@bp.get("/api/progress")
def api_progress():
    return jsonify(_store().progress(g.annotator.name))


@bp.get("/api/stats")
def api_stats():
    _require_admin()
    return jsonify(_store().stats())
