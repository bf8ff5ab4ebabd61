"""Serve the annotation web app for a preference store.

  alignkit annotate --store S [--port 8000] [--host 127.0.0.1] [--labels-per-pair 1]

The store must exist (``alignkit store import`` creates it). People log in with tokens from
``alignkit store annotator add NAME``; ``alignkit store annotator reset-token NAME`` logs out
every session of NAME. Set ALIGNKIT_SECRET_KEY to keep people logged in across restarts. Plain
HTTP: put it behind a TLS proxy before exposing it beyond this machine. A bad argument or store
prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from pathlib import Path


def _number(kind, what: str, ok, bound: str):
    """An argparse type: ``kind(text)`` that ``ok`` accepts, else a message naming ``bound``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


# 0 is any free port (documented in --help); nan fails every comparison, so it is refused too.
_port = _number(int, "a port number", lambda v: 0 <= v <= 65535, "1..65535 (or 0: any free port)")
_at_least_one = _number(int, "a whole number", lambda v: v >= 1, ">= 1")
_seconds = _number(float, "seconds", lambda v: v > 0 and math.isfinite(v),
                   "a positive number of seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--store", required=True, help="an existing SQLite preference store")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port", type=_port, default=8000, help="port, 1..65535 (0: any free port)"
    )
    parser.add_argument(
        "--labels-per-pair",
        type=_at_least_one,
        default=1,
        help="how many people label each pair (2+ to measure agreement)",
    )
    parser.add_argument(
        "--assignment-ttl",
        type=_seconds,
        default=3600.0,
        help="seconds an unanswered pair stays reserved for one person",
    )


def _fail(message: object) -> None:
    from alignkit.feedback.store_cli import printable

    print(f"alignkit annotate: error: {printable(message)}", file=sys.stderr)
    sys.exit(2)


def run(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    from alignkit.feedback.annotate.app import create_app
    from alignkit.data.store import PreferenceStore, StoreError
    from alignkit.serve import serve_until_interrupted

    try:
        # create=False: serving a mistyped path would show everyone an empty store.
        with PreferenceStore(args.store, create=False) as store:
            n_pairs, n_people = store.count("pairs"), store.count("annotators")
    except StoreError as e:
        missing = not Path(args.store).exists()
        _fail(f"{e}{' (`alignkit store import --pairs FILE` creates one)' if missing else ''}")
    app = create_app(
        args.store, labels_per_pair=args.labels_per_pair, assignment_ttl_s=args.assignment_ttl
    )
    if not _is_loopback(args.host):
        print(
            f"alignkit annotate: warning: listening on {args.host} over plain HTTP; access "
            "tokens travel unencrypted unless a TLS proxy sits in front",
            file=sys.stderr,
        )
    # A port in use or an unknown host: werkzeug prints the cause and exits 1, no traceback.
    server = make_server(args.host, args.port, app, threaded=True)
    print(
        f"alignkit annotate: {args.store}: {n_pairs} pairs, {n_people} annotators; "
        f"serving on http://{args.host}:{server.server_port}/ (Ctrl+C to stop)",
        flush=True,
    )
    if n_people == 0:
        print(
            f"  no annotators yet: alignkit store annotator add NAME --store {args.store}",
            flush=True,
        )
    serve_until_interrupted(server)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
