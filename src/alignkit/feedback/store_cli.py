"""Manage a preference store: import pairs and datasets, export training data, add annotators.

alignkit store import --store S --pairs FILE.jsonl
alignkit store import --store S --preferences FILE.jsonl --source human|ai|simulated
alignkit store export --store S --out FILE.jsonl --format preference|unpaired
alignkit store annotator add NAME --store S [--admin]
alignkit store annotator reset-token NAME --store S   (also logs out every session of NAME)
alignkit store annotator list --store S
alignkit store stats --store S

Only ``import`` and ``annotator add`` create a new store; every other action refuses a --store
that does not exist (a typo must not read as an empty store). Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

from alignkit.data.store import SOURCES, PreferenceStore, StoreError, is_text


def _share(text: str) -> float:
    """A fraction of the votes, in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import", help="import generated pairs or a labelled preference dataset"
    )
    what = imp.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", help="JSONL of {prompt, response_a, response_b, [model]} to label")
    what.add_argument("--preferences", help="JSONL of {prompt, chosen, rejected}, already labelled")
    imp.add_argument(
        "--source", choices=SOURCES, help="who labelled --preferences (required with it)"
    )
    imp.add_argument(
        "--annotator", help="annotator/judge id for --preferences (default: import:<file name>)"
    )

    exp = actions.add_parser("export", help="write labelled pairs as training JSONL")
    exp.add_argument("--out", required=True, help="output JSONL file")
    exp.add_argument(
        "--format",
        choices=("preference", "unpaired"),
        default="preference",
        help="{prompt, chosen, rejected} or {prompt, completion, label}",
    )
    exp.add_argument("--source", choices=SOURCES, help="only labels from this source")
    exp.add_argument("--annotator", help="only labels by this annotator or judge")
    exp.add_argument(
        "--min-agreement",
        type=_share,
        default=0.0,
        help="drop pairs whose majority label has less than this share of the votes",
    )
    exp.add_argument(
        "--ties",
        choices=("drop", "split"),
        default="drop",
        help="drop tied pairs, or split them into both orders",
    )

    ann = actions.add_parser("annotator", help="manage the people who label in the web app")
    ann_actions = ann.add_subparsers(dest="annotator_action", required=True, metavar="ACTION")
    add = ann_actions.add_parser("add", help="add an annotator and print their access token once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may see the stats page")
    reset = ann_actions.add_parser(
        "reset-token", help="print a new token; the old one stops working"
    )
    reset.add_argument("name")
    ann_actions.add_parser("list", help="list annotators")

    actions.add_parser("stats", help="print label counts and agreement as JSON")

    for sub in (imp, exp, *ann_actions.choices.values(), actions.choices["stats"]):
        creates = sub in (imp, ann_actions.choices["add"])
        sub.add_argument(
            "--store",
            required=True,
            help="the SQLite preference store" + (" (created if new)" if creates else ""),
        )


def printable(text: object) -> str:
    """``text`` with control and other unprintable characters escaped (``\\r``, ``\\udcff``):
    a file name holding a newline, or a surrogate-escaped byte, stays one readable line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))


def _fail(message: object) -> None:
    print(f"alignkit store: error: {printable(message)}", file=sys.stderr)
    sys.exit(2)


def run(args: argparse.Namespace) -> None:
    creates = args.action == "import" or getattr(args, "annotator_action", None) == "add"
    for attr, flag in (("name", "NAME"), ("annotator", "--annotator")):
        value = getattr(args, attr, None)
        # Command lines that are not UTF-8 arrive with lone surrogates, which SQLite cannot hold.
        if value is not None and not is_text(value):
            _fail(f"{flag} {value!r} is not valid Unicode text")
    if args.action == "import":
        source = args.pairs if args.pairs is not None else args.preferences
        # Checked before the store is opened: a mistyped input must not leave a new empty store.
        if not source:
            _fail(f"{'--pairs' if args.pairs is not None else '--preferences'}: empty file name")
        if not Path(source).exists():
            _fail(f"{source}: no such file")
    if not creates and not Path(args.store).exists():
        _fail(
            f"{args.store}: no such store (only `alignkit store import` and "
            "`alignkit store annotator add` create one)"
        )
    try:
        with PreferenceStore(args.store, create=creates) as store:
            _run(store, args)
    except (StoreError, ValueError) as e:
        _fail(e)
    except OSError as e:  # export: --out is a folder, or not writable
        _fail(f"{e.filename or args.store}: {e.strerror or e}")
    except sqlite3.Error as e:  # still locked after the busy timeout, disk full, ...
        _fail(f"{args.store}: {e}")


def _run(store: PreferenceStore, args: argparse.Namespace) -> None:
    if args.action == "import":
        if args.pairs is not None:
            counts = store.import_pairs(args.pairs)
            what = args.pairs
        else:
            if args.source is None:
                raise StoreError("--preferences needs --source (human, ai or simulated)")
            counts = store.import_preferences(
                args.preferences, source=args.source, annotator=args.annotator
            )
            what = args.preferences
        print(
            f"{what}: {counts['added']} added, {counts['existing']} already in the store, "
            f"{counts['identical']} skipped (identical responses)"
        )
    elif args.action == "export":
        n = store.export_jsonl(
            args.out,
            format=args.format,
            source=args.source,
            annotator=args.annotator,
            min_agreement=args.min_agreement,
            ties=args.ties,
        )
        print(f"{args.out}: {n} {args.format} records")
    elif args.action == "annotator":
        if args.annotator_action == "list":
            for a in store.annotators():
                print(f"{a.name}{'  (admin)' if a.is_admin else ''}")
            return
        if args.annotator_action == "add":
            token = store.add_annotator(args.name, admin=args.admin)
        else:
            token = store.reset_token(args.name)
        print(
            f"access token for {args.name!r} (shown once; only its hash is stored):",
            file=sys.stderr,
        )
        print(token)
    elif args.action == "stats":
        print(json.dumps(store.stats(), indent=2))
