"""Serve the annotation web app for a preference store.

  alignkit annotate --store S [--port 8000] [--host 127.0.0.1] [--labels-per-pair 1]

People log in with tokens from ``alignkit store annotator add NAME``. Set ALIGNKIT_SECRET_KEY to
keep people logged in across restarts. Plain HTTP: put it behind a TLS proxy before exposing it
beyond this machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--store", required=True, help="the SQLite preference store")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--labels-per-pair",
        type=int,
        default=1,
        help="how many people label each pair (2+ to measure agreement)",
    )
    parser.add_argument(
        "--assignment-ttl",
        type=float,
        default=3600.0,
        help="seconds an unanswered pair stays reserved for one person",
    )


def run(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    from alignkit.feedback.annotate.app import create_app
    from alignkit.data.store import PreferenceStore
    from alignkit.serve import serve_until_interrupted

    if args.labels_per_pair < 1:
        sys.exit("alignkit annotate: --labels-per-pair must be >= 1")
    with PreferenceStore(args.store) as store:
        n_pairs, n_people = store.count("pairs"), store.count("annotators")
    app = create_app(
        args.store, labels_per_pair=args.labels_per_pair, assignment_ttl_s=args.assignment_ttl
    )
    if not _is_loopback(args.host):
        print(
            f"alignkit annotate: warning: listening on {args.host} over plain HTTP; access "
            "tokens travel unencrypted unless a TLS proxy sits in front",
            file=sys.stderr,
        )
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
