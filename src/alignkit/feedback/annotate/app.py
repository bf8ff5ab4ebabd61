"""The annotation web app (Flask): people compare two responses to a prompt and pick the better.

Pages (signed session cookie after logging in with an access token; every form POST carries a
CSRF token):

  GET  /login, POST /login      log in with the token from ``alignkit store annotator add``
  POST /logout
  GET  /                        the next pair: prompt, two responses side by side, progress
  POST /label                   answer it: choice=left|right|tie|skip, optional comment
  GET  /stats                   labels per annotator and agreement (admins only)

JSON API (``Authorization: Bearer TOKEN``; no cookies, hence no CSRF):

  GET  /api/next  ->  {pair_id, prompt, left, right, progress}  (pair_id null when done)
  POST /api/label     {pair_id, choice, [comment]}  ->  {comparison_id}
  GET  /api/progress, GET /api/stats (admins only)

Which response is shown on the left is random per (pair, annotator) and recorded with the label.
Responses are untrusted model output: templates autoescape, and the Content-Security-Policy
allows no inline script, so escaping mistakes cannot run code either.
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
from werkzeug.exceptions import HTTPException

from alignkit.data.store import PreferenceStore, StoreError

MAX_COMMENT = 2000
SIDES = ("left", "right", "tie", "skip")
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
) -> Flask:
    """The app serving the store at ``store_path`` (created/migrated now).

    ``secret_key`` signs session cookies; default ``$ALIGNKIT_SECRET_KEY``, else a random key
    (everyone is logged out when the app restarts).
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


def _error(e: HTTPException):
    if _is_api():
        response = jsonify(error=e.description)
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
        if not sent or "csrf" not in session or not hmac.compare_digest(sent, session["csrf"]):
            abort(400, "missing or invalid CSRF token; reload the page and try again")
    if request.endpoint in ("annotate.login", "static"):
        return None
    if "annotator_id" in session:
        g.annotator = _store().annotator_by_id(session["annotator_id"])
    if g.annotator is None:
        session.pop("annotator_id", None)
        if request.method == "GET":
            return redirect(url_for("annotate.login"))
        abort(401, "log in first")
    return None


def _require_admin() -> None:
    if not g.annotator.is_admin:
        abort(403, "only admins may see the statistics")


def _pair_view(store: PreferenceStore) -> dict:
    name = g.annotator.name
    assignment = store.next_pair_for(name)
    view = {
        "pair_id": None,
        "prompt": None,
        "left": None,
        "right": None,
        "progress": store.progress(name),
    }
    if assignment is not None:
        view.update(
            pair_id=assignment.pair_id,
            prompt=assignment.prompt,
            left=assignment.left,
            right=assignment.right,
        )
    return view


def _submit(store: PreferenceStore, pair_id: object, choice: object, comment: object) -> int | None:
    if choice not in SIDES:
        abort(400, f"choice must be one of {', '.join(SIDES)}")
    try:
        pair_id = int(pair_id)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        abort(400, "pair_id must be an integer")
    if comment is not None and not isinstance(comment, str):
        abort(400, "comment must be a string")
    comment = (comment or "").strip()[:MAX_COMMENT] or None
    try:
        return store.submit(g.annotator.name, pair_id, choice, comment)
    except StoreError as e:
        abort(409, str(e))


# -- pages --------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    error = None
    if request.method == "POST":
        annotator = _store().annotator_by_token(request.form.get("token", "").strip())
        if annotator is not None:
            session.clear()  # a fresh session (and CSRF token) for the logged-in person
            session["annotator_id"] = annotator.id
            return redirect(url_for("annotate.index"), code=303)
        error = "Unknown access token."
    return render_template("login.html", error=error), 401 if error else 200


@bp.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("annotate.login"), code=303)


@bp.get("/")
def index():
    return render_template("annotate.html", **_pair_view(_store()))


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
    return jsonify(_pair_view(_store()))


@bp.post("/api/label")
def api_label():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "expected a JSON object body")
    comparison_id = _submit(_store(), body.get("pair_id"), body.get("choice"), body.get("comment"))
    return jsonify(comparison_id=comparison_id)


@bp.get("/api/progress")
def api_progress():
    return jsonify(_store().progress(g.annotator.name))


@bp.get("/api/stats")
def api_stats():
    _require_admin()
    return jsonify(_store().stats())
