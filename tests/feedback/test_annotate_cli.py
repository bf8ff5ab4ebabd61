"""``alignkit annotate``'s command line: bad values are one line on stderr and exit code 2, before
anything is created or bound; a store that does not exist is refused, not served empty."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("flask")

from alignkit.data.store import PreferenceStore  # noqa: E402
from alignkit.feedback.annotate import cli  # noqa: E402


def _parse(argv):
    parser = argparse.ArgumentParser(prog="alignkit annotate")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def _exit_2(argv, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(_parse(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "prefs.db"
    with PreferenceStore(path) as s:
        s.add_pair_from_texts("q", "x", "y")
    return path


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--port", "8765999", "must be 1..65535 (or 0: any free port), got 8765999"),
        ("--port", "-1", "must be 1..65535 (or 0: any free port), got -1"),
        ("--port", "80.5", "expected a port number, got '80.5'"),
        ("--labels-per-pair", "0", "must be >= 1, got 0"),
        ("--assignment-ttl", "nan", "must be a positive number of seconds, got nan"),
        ("--assignment-ttl", "-5", "must be a positive number of seconds, got -5"),
        ("--assignment-ttl", "inf", "must be a positive number of seconds, got inf"),
    ],
)
def test_out_of_range_values_are_refused(db, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        _parse(["--store", str(db), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {message}" in err


def test_port_zero_is_any_free_port_and_1_to_65535_are_ports(db):
    assert [_parse(["--store", str(db), "--port", p]).port for p in ("0", "1", "65535")] == [
        0,
        1,
        65535,
    ]


def test_a_store_that_does_not_exist_is_refused_not_created(tmp_path, capsys):
    typo = tmp_path / "typo.db"
    err = _exit_2(["--store", str(typo)], capsys)
    assert err.startswith(f"alignkit annotate: error: {typo}: no such store")
    assert "alignkit store import" in err and not typo.exists()
    (tmp_path / "notes.txt").write_text("words")
    err = _exit_2(["--store", str(tmp_path / "notes.txt")], capsys)
    assert err.strip() == (
        f"alignkit annotate: error: {tmp_path / 'notes.txt'}: not a usable preference store: "
        "file is not a database"
    )
    err = _exit_2(["--store", str(tmp_path)], capsys)
    assert err.strip() == f"alignkit annotate: error: {tmp_path}: is a folder, not a store file"

