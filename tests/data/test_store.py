"""The preference store: schema and migrations, dedupe, labels, assignment, stats, import/export,
and safety with concurrent writer processes and a process killed mid-transaction."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import time

import pytest

from alignkit.cli import main as cli_main
from alignkit.data import store as store_mod
from alignkit.data.store import (
    MIGRATIONS,
    LabelConflict,
    PreferenceStore,
    StoreError,
    StoreInputError,
    cohen_kappa,
    majority,
    migrate,
)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "prefs.db"


@pytest.fixture
def store(path):
    with PreferenceStore(path) as s:
        yield s


def _pairs(store, n, prompt="p"):
    return [store.add_pair_from_texts(f"{prompt}{i}", f"good {i}", f"bad {i}") for i in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- schema --------------------------------------------------------------------------------------


def test_new_store_is_wal_at_latest_version(store, path):
    assert store.schema_version == len(MIGRATIONS) == 2
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_migrates_a_version_1_store_keeping_its_data(path):
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, MIGRATIONS[:1]) == 1
    conn.execute("INSERT INTO prompts (id, text, hash) VALUES (1, 'q', 'h')")
    conn.execute(
        "INSERT INTO responses (id, prompt_id, text, hash)"
        " VALUES (1, 1, 'x', 'hx'), (2, 1, 'y', 'hy')"
    )
    conn.execute("INSERT INTO pairs (id, prompt_id, response_a, response_b) VALUES (1, 1, 1, 2)")
    conn.execute(
        "INSERT INTO comparisons (pair_id, label, source, annotator)"
        " VALUES (1, 'b', 'human', 'ann')"
    )
    conn.close()

    with PreferenceStore(path) as s:
        assert s.schema_version == 2
        [row] = s.comparisons()
        assert (row["prompt"], row["response_a"], row["response_b"], row["label"]) == (
            "q",
            "x",
            "y",
            "b",
        )
        assert row["prob_a"] is None and row["cost"] is None  # columns added by version 2
        s.add_comparison(1, "a", source="ai", annotator="judge", prob_a=0.8, cost=0.01)
        assert s.comparisons(source="ai")[0]["prob_a"] == 0.8
        s.put_cached("k", judge="judge", template_version="v1", answer="A")
        assert s.get_cached("k")["answer"] == "A"


def test_a_failing_migration_changes_nothing(path, monkeypatch):
    PreferenceStore(path).close()
    broken = ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL")
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError):
        PreferenceStore(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert (
        conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0]
        == 0
    )


def test_refuses_a_store_from_a_newer_alignkit(path):
    PreferenceStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        PreferenceStore(path)


def test_a_path_that_is_no_store_is_one_clear_error(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not a database, just words\n")
    cases = [
        (tmp_path / "folder", {}, "is a folder, not a store file"),
        (tmp_path / "missing" / "s.db", {}, "folder " + str(tmp_path / "missing") + " does not"),
        (tmp_path / "notes.txt", {}, "not a usable preference store: file is not a database"),
        (tmp_path / "typo.db", {"create": False}, "no such store"),
    ]
    for bad, options, cause in cases:
        with pytest.raises(StoreError) as e:
            PreferenceStore(bad, **options)
        assert str(e.value).startswith(f"{bad}: ") and cause in str(e.value)
    assert not (tmp_path / "typo.db").exists()  # create=False created nothing
    assert (tmp_path / "notes.txt").read_text() == "not a database, just words\n"


# -- content -------------------------------------------------------------------------------------


def test_prompts_responses_and_pairs_are_deduplicated(store):
    p = store.add_prompt("Write a haiku")
    assert store.add_prompt("Write a haiku") == p
    x = store.add_response(p, "one", model="m1", sampling={"temperature": 0.7})
    assert store.add_response(p, "one", model="m2") == x
    y = store.add_response(p, "two")
    other = store.add_response(store.add_prompt("Another"), "one")
    assert other != x  # the same text answering another prompt is another response
    pair = store.add_pair(x, y)
    assert store.add_pair(y, x) == pair
    assert store.pair(pair).response_a_id == x
    assert [store.count(t) for t in ("prompts", "responses", "pairs")] == [2, 3, 1]
    with pytest.raises(StoreError):
        store.add_pair(x, x)
    with pytest.raises(StoreError, match="same prompt"):
        store.add_pair(x, other)


def test_one_label_per_person_and_pair_but_judges_may_repeat(store):
    [pair] = _pairs(store, 1)
    assert store.add_comparison(pair, "a", source="human", annotator="ann") is not None
    assert store.add_comparison(pair, "b", source="human", annotator="ann") is None
    assert store.add_comparison(pair, "b", source="human", annotator="bob") is not None
    for _ in range(2):  # e.g. a judge asked in both orders
        assert (
            store.add_comparison(pair, "a", source="ai", annotator="judge", prob_a=0.9) is not None
        )
    assert store.count("comparisons") == 4
    for bad in [dict(label="c"), dict(source="crowd"), dict(prob_a=1.5), dict(shown_left="x")]:
        kwargs = dict(label="a", source="ai", annotator="j") | bad
        with pytest.raises(ValueError):
            store.add_comparison(pair, kwargs.pop("label"), **kwargs)
    assert store.count("comparisons") == 4


def test_judgement_cache_serves_identical_requests(path):
    key = PreferenceStore.request_key("gpt-judge", "v3", "q", "x", "y")
    assert key != PreferenceStore.request_key("gpt-judge", "v3", "q", "y", "x")
    assert key != PreferenceStore.request_key("gpt-judge", "v4", "q", "x", "y")
    with PreferenceStore(path) as s:
        assert s.get_cached(key) is None
        s.put_cached(
            key,
            judge="gpt-judge",
            template_version="v3",
            answer="A",
            prompt_tokens=120,
            completion_tokens=3,
            cost=0.002,
        )
        s.put_cached(key, judge="gpt-judge", template_version="v3", answer="B")  # first one wins
    with PreferenceStore(path) as s:
        assert s.get_cached(key) == {
            "judge": "gpt-judge",
            "template_version": "v3",
            "answer": "A",
            "prompt_tokens": 120,
            "completion_tokens": 3,
            "cost": 0.002,
        }


def test_annotator_tokens_are_stored_hashed(store, path):
    token = store.add_annotator("ann", admin=True)
    assert len(token) >= 40
    stored = sqlite3.connect(path).execute("SELECT token_hash FROM annotators").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    assert store.annotator_by_token(token).name == "ann" and store.annotator("ann").is_admin
    assert store.annotator_by_token("wrong") is None and store.annotator_by_token("") is None
    with pytest.raises(StoreError, match="exists"):
        store.add_annotator("ann")
    new = store.reset_token("ann")
    assert store.annotator_by_token(token) is None and store.annotator_by_token(new).name == "ann"


# -- assignment ----------------------------------------------------------------------------------


def test_a_person_never_gets_the_same_pair_twice(store):
    pairs = _pairs(store, 4)
    store.add_annotator("ann")
    seen = []
    for choice in ["left", "skip", "right", "tie"]:
        a = store.next_pair_for("ann")
        assert store.assignment("ann", a.pair_id) == a  # its page shows it again, same order
        seen.append(a.pair_id)
        store.submit("ann", a.pair_id, choice)
    assert sorted(seen) == pairs
    assert store.next_pair_for("ann") is None
    assert store.progress("ann") == {"labelled": 3, "skipped": 1, "remaining": 0, "total": 3}


def test_left_right_are_mapped_through_the_order_shown(store):
    _pairs(store, 2)
    store.add_annotator("ann")
    first = store.next_pair_for("ann")
    cid = store.submit("ann", first.pair_id, "left", comment="  clearer ")
    second = store.next_pair_for("ann")
    store.submit("ann", second.pair_id, "right")
    rows = store.comparisons(annotator="ann")
    assert rows[0]["id"] == cid and rows[0]["comment"] == "  clearer "
    assert rows[0]["label"] == first.shown_left and rows[0]["shown_left"] == first.shown_left
    assert rows[1]["label"] != second.shown_left and rows[1]["shown_left"] == second.shown_left
    assert first.left == (first.response_a if first.shown_left == "a" else first.response_b)
    # The same answer again is the same label; a different one is refused, naming the first.
    assert store.submit("ann", first.pair_id, "left") == cid
    with pytest.raises(LabelConflict, match="already labelled it 'left'") as e:
        store.submit("ann", first.pair_id, "right")
    assert (e.value.comparison_id, e.value.choice) == (cid, "left")
    assert [r["label"] for r in store.comparisons(annotator="ann")] == [
        first.shown_left,
        "b" if second.shown_left == "a" else "a",
    ]


def test_left_is_random(store):
    import random

    _pairs(store, 30)
    store.add_annotator("ann")
    rng = random.Random(7)
    sides = []
    while (a := store.next_pair_for("ann", rng=rng)) is not None:
        sides.append(a.shown_left)
        store.submit("ann", a.pair_id, "tie")
    assert len(sides) == 30 and 5 < sides.count("a") < 25


def test_submitting_an_unassigned_pair_is_refused(store):
    pairs = _pairs(store, 2)
    store.add_annotator("ann")
    with pytest.raises(StoreError, match="not assigned"):
        store.submit("ann", pairs[0], "a")
    with pytest.raises(StoreError, match="no annotator"):
        store.next_pair_for("ghost")


def test_each_call_is_another_tab_with_another_pair_up_to_max_open(store):
    pairs = _pairs(store, 5)
    store.add_annotator("ann")
    tabs = [store.next_pair_for("ann", max_open=3) for _ in range(3)]
    assert [t.pair_id for t in tabs] == pairs[:3]  # three tabs, three different pairs
    # Holding max_open: the pair handed out longest ago comes back, in its order, renewed...
    assert store.next_pair_for("ann", max_open=3) == tabs[0]
    assert store.next_pair_for("ann", max_open=3) == tabs[1]
    assert store.progress("ann")["remaining"] == 5  # 3 held + 2 never handed out
    # ... and answering one frees a slot for a new pair.
    store.submit("ann", tabs[2].pair_id, "left")
    assert store.next_pair_for("ann", max_open=3).pair_id == pairs[3]
    # With no new pair left, the held ones come back until answered (none is lost).
    store.submit("ann", tabs[0].pair_id, "tie")
    assert store.next_pair_for("ann", max_open=3).pair_id == pairs[4]
    held = {store.next_pair_for("ann", max_open=3).pair_id for _ in range(3)}
    assert held == {tabs[1].pair_id, pairs[3], pairs[4]}
    for pid in held:
        store.submit("ann", pid, "right")
    assert store.next_pair_for("ann", max_open=3) is None
    assert store.progress("ann") == {"labelled": 5, "skipped": 0, "remaining": 0, "total": 5}


def test_answering_a_pair_twice_is_idempotent_or_a_conflict_never_silent(store):
    pairs = _pairs(store, 3)
    store.add_annotator("ann")
    a, b, c = (store.next_pair_for("ann") for _ in pairs)
    cid = store.submit("ann", a.pair_id, "left")
    assert isinstance(cid, int)
    assert store.submit("ann", a.pair_id, "left") == cid  # a double click or a retried request
    a_label = a.shown_left
    # Naming the stored side ("a" or "b") instead of "left" is the same answer too.
    assert store.submit("ann", a.pair_id, a_label) == cid
    for second in ("right", "tie", "skip"):
        with pytest.raises(LabelConflict) as e:
            store.submit("ann", a.pair_id, second)
        assert (e.value.comparison_id, e.value.choice) == (cid, "left")
        assert f"pair {a.pair_id}: 'ann' already labelled it 'left' (comparison {cid})" in str(
            e.value
        )
    # A skip, then a label from another tab: the label is kept (it says more than the skip).
    assert store.submit("ann", b.pair_id, "skip") is None
    assert store.submit("ann", b.pair_id, "skip") is None
    cid_b = store.submit("ann", b.pair_id, "tie")
    assert isinstance(cid_b, int) and cid_b != cid
    with pytest.raises(LabelConflict, match="already labelled it 'tie'"):
        store.submit("ann", b.pair_id, "skip")
    rows = store.comparisons(annotator="ann")
    assert [(r["pair_id"], r["label"]) for r in rows] == [(a.pair_id, a_label), (b.pair_id, "tie")]
    assert store.progress("ann") == {"labelled": 2, "skipped": 0, "remaining": 1, "total": 3}
    assert store.assignment("ann", c.pair_id).status == "open"


def test_labels_per_pair_caps_how_many_people_see_a_pair(path):
    with PreferenceStore(path, labels_per_pair=2) as s:
        pairs = _pairs(s, 3)
        for name in ("ann", "bob", "cy"):
            s.add_annotator(name)
        got = {}
        for name in ("ann", "bob", "cy"):
            got[name] = []
            while (a := s.next_pair_for(name)) is not None:
                got[name].append(a.pair_id)
                s.submit(name, a.pair_id, "a")
        assert got["ann"] == pairs and got["bob"] == pairs and got["cy"] == []
        # An open (unanswered) assignment also reserves its pair...
        s.add_annotator("dan")
        s.add_annotator("eve")
        extra = s.add_pair_from_texts("new", "u", "v")
        assert s.next_pair_for("dan", labels_per_pair=1).pair_id == extra
        assert s.next_pair_for("eve", labels_per_pair=1) is None
    # ... until it goes stale.
    with PreferenceStore(path, assignment_ttl_s=0.0) as s:
        assert s.next_pair_for("eve", labels_per_pair=1).pair_id == extra


# -- statistics ----------------------------------------------------------------------------------


def test_cohen_kappa_and_majority_by_hand():
    # Wikipedia's example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> p_o .7, p_e .5, kappa .4
    ratings = [("a", "a")] * 20 + [("a", "b")] * 5 + [("b", "a")] * 10 + [("b", "b")] * 15
    assert cohen_kappa(ratings) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa([("a", "a")] * 3) is None and cohen_kappa([]) is None
    assert majority(["a", "b", "a"]) == ("a", pytest.approx(2 / 3))
    assert majority(["a", "b"]) == ("tie", 0.5)
    assert majority(["tie", "tie", "b"]) == ("tie", pytest.approx(2 / 3))


def test_stats_agreement_by_hand(store):
    pairs = _pairs(store, 5)
    x = ["a", "a", "b", "tie"]
    y = ["a", "b", "b", "tie"]
    for pair, lx, ly in zip(pairs[:4], x, y, strict=True):
        store.add_comparison(pair, lx, source="human", annotator="x")
        store.add_comparison(pair, ly, source="human", annotator="y")
        store.add_comparison(pair, "a", source="ai", annotator="judge")
    store.add_comparison(pairs[4], "b", source="human", annotator="x")  # single human label
    store.add_comparison(pairs[4], "b", source="simulated", annotator="sim")
    st = store.stats()
    assert st["pairs"] == 5 and st["pairs_labelled_by_humans"] == 5
    assert {(r["annotator"], r["labels"]) for r in st["labels_per_annotator"]} == {
        ("judge", 4),
        ("sim", 1),
        ("x", 5),
        ("y", 4),
    }
    ia = st["inter_annotator"]
    assert ia["pairs"] == 4 and ia["percent_agreement"] == 0.75
    # p_o = 3/4; marginals x (a2 b1 t1), y (a1 b2 t1): p_e = 5/16; kappa = (12/16-5/16)/(11/16)
    assert ia["kappa"] == pytest.approx(7 / 11, abs=1e-12)
    assert ia["by_annotators"] == [
        {
            "annotators": ["x", "y"],
            "n": 4,
            "percent_agreement": 0.75,
            "kappa": pytest.approx(7 / 11),
        }
    ]
    judge, sim = st["human_vs"]
    # 8 human labels vs "a": 3 agree; humans a3 b3 t2 vs judge a8 -> p_e = 3/8 = p_o -> kappa 0
    assert (judge["judge"], judge["n"], judge["percent_agreement"]) == ("judge", 8, 3 / 8)
    assert judge["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert (sim["source"], sim["n"], sim["percent_agreement"], sim["kappa"]) == (
        "simulated",
        1,
        1.0,
        None,
    )


# -- import / export -----------------------------------------------------------------------------


def test_import_preferences_then_export_majority(store, tmp_path):
    existing = store.add_pair_from_texts("q0", "worse", "better")  # stored reversed
    prefs = _write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "q0", "chosen": "better", "rejected": "worse"},
            {"prompt": "q1", "chosen": "c1", "rejected": "r1"},
            {"prompt": "q2", "chosen": "same", "rejected": "same"},
        ],
    )
    assert store.import_preferences(prefs, source="human") == {
        "added": 2,
        "existing": 0,
        "identical": 1,
    }
    assert store.import_preferences(prefs, source="human") == {
        "added": 0,
        "existing": 2,
        "identical": 1,
    }
    assert store.comparisons(annotator="import:prefs.jsonl")[0]["label"] == "b"
    assert store.pair(existing).response_b == "better"
    # two more people on q0: b, a -> 2 of 3 for "better"
    store.add_comparison(existing, "b", source="human", annotator="ann")
    store.add_comparison(existing, "a", source="human", annotator="bob")
    out = list(store.export())
    assert {"prompt": "q0", "chosen": "better", "rejected": "worse"} in out and len(out) == 2
    assert len(list(store.export(min_agreement=0.66))) == 2
    assert list(store.export(min_agreement=0.7)) == [
        {"prompt": "q1", "chosen": "c1", "rejected": "r1"}
    ]
    assert list(store.export(annotator="bob")) == [
        {"prompt": "q0", "chosen": "worse", "rejected": "better"}
    ]
    assert list(store.export(source="ai")) == []
    assert list(store.export(format="unpaired", annotator="bob")) == [
        {"prompt": "q0", "completion": "worse", "label": True},
        {"prompt": "q0", "completion": "better", "label": False},
    ]


def test_export_ties(store):
    tied, split_vote = _pairs(store, 2)
    store.add_comparison(tied, "tie", source="ai", annotator="j")
    store.add_comparison(split_vote, "a", source="human", annotator="ann")
    store.add_comparison(split_vote, "b", source="human", annotator="bob")
    assert list(store.export()) == []
    both = list(store.export(ties="split", source="ai"))
    assert both == [
        {"prompt": "p0", "chosen": "good 0", "rejected": "bad 0"},
        {"prompt": "p0", "chosen": "bad 0", "rejected": "good 0"},
    ]
    assert len(list(store.export(ties="split"))) == 4  # the 1-1 split vote is a tie too


def test_bad_jsonl_names_file_and_line_and_imports_nothing(store, tmp_path):
    good = {"prompt": "q", "response_a": "x", "response_b": "y"}
    cases = [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"prompt": "q", "response_a": "x"}), "missing field 'response_b'"),
        (json.dumps(good | {"response_b": 3}), "'response_b' must be a string"),
    ]
    for i, (line, message) in enumerate(cases):
        f = tmp_path / f"bad{i}.jsonl"
        f.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(StoreInputError) as e:
            store.import_pairs(f)
        assert str(e.value).startswith(f"{f}:3: ") and message in str(e.value)
    assert store.count("prompts") == 0


def test_a_lone_surrogate_in_an_import_names_file_line_and_field(store, tmp_path):
    # Valid JSON, valid UTF-8 bytes, but "\ud800" decodes to text SQLite cannot hold.
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"prompt": "q", "response_a": "x", "response_b": "y"}\n'
        '{"prompt": "q", "response_a": "x\\ud800", "response_b": "y"}\n'
    )
    with pytest.raises(StoreInputError) as e:
        store.import_pairs(f)
    assert str(e.value) == f"{f}:2: field 'response_a' is not valid Unicode text (a lone surrogate)"
    g = tmp_path / "prefs.jsonl"
    g.write_text('{"prompt": "q", "chosen": "x", "rejected": "y", "model": "\\udfff"}\n')
    with pytest.raises(StoreInputError, match=f"^{g}:1: field 'model' is not valid Unicode"):
        store.import_preferences(g, source="ai")
    assert store.count("prompts") == 0


def test_export_refuses_a_min_agreement_outside_0_1(store):
    [pair] = _pairs(store, 1)
    store.add_comparison(pair, "a", source="human", annotator="ann")
    assert len(list(store.export(min_agreement=1.0))) == 1
    for bad in (5.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"min_agreement must be in \[0, 1\]"):
            list(store.export(min_agreement=bad))


def test_cli_import_export_annotator(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    pairs = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": "q",
                "response_a": "x",
                "response_b": "y",
                "model": "policy-1",
                "sampling": {"temperature": 1.0},
            }
        ],
    )
    cli_main(["store", "import", "--store", db, "--pairs", str(pairs)])
    assert "1 added" in capsys.readouterr().out
    cli_main(["store", "annotator", "add", "ann", "--admin", "--store", db])
    token = capsys.readouterr().out.strip()
    with PreferenceStore(db) as s:
        assert s.annotator_by_token(token).is_admin
        a = s.next_pair_for("ann")
        s.submit("ann", a.pair_id, "a")
        assert (
            sqlite3.connect(db).execute("SELECT model, sampling FROM responses").fetchall()
            == [("policy-1", '{"temperature": 1.0}')] * 2
        )
    out = tmp_path / "out.jsonl"
    cli_main(["store", "export", "--store", db, "--out", str(out), "--source", "human"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "q", "chosen": "x", "rejected": "y"}
    ]
    cli_main(["store", "export", "--store", db, "--out", str(out), "--format", "unpaired"])
    assert len(out.read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "x", "rejected": "y"}\n{oops\n')
    with pytest.raises(SystemExit) as e:
        cli_main(["store", "import", "--store", db, "--preferences", str(bad), "--source", "ai"])
    assert e.value.code == 2 and f"{bad}:2: invalid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["store", "import", "--store", db, "--preferences", str(pairs)])  # no --source
    assert "needs --source" in capsys.readouterr().err


def _cli_error(argv, capsys) -> str:
    """The one stderr line of a store command that must fail with exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(["store", *argv])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    return captured.err.strip()


def test_cli_commands_that_read_refuse_a_store_that_does_not_exist(tmp_path, capsys):
    typo = tmp_path / "typo.db"
    for argv in (
        ["stats"],
        ["export", "--out", str(tmp_path / "o.jsonl")],
        ["annotator", "list"],
        ["annotator", "reset-token", "ann"],
    ):
        err = _cli_error([*argv, "--store", str(typo)], capsys)
        assert err.startswith(f"alignkit store: error: {typo}: no such store")
        assert not typo.exists()
    # import of a missing file does not create the store either; annotator add does.
    no_file = tmp_path / "no.jsonl"
    err = _cli_error(["import", "--store", str(typo), "--pairs", str(no_file)], capsys)
    assert err == f"alignkit store: error: {no_file}: no such file"
    assert not typo.exists()
    cli_main(["store", "annotator", "add", "ann", "--store", str(typo)])
    assert typo.exists() and len(capsys.readouterr().out.strip()) >= 40


def test_cli_a_store_path_that_is_no_store_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("words\n")
    missing = tmp_path / "missing" / "s.db"
    for store, argv, cause in [
        (tmp_path / "folder", ["stats"], "is a folder, not a store file"),
        (tmp_path / "folder", ["annotator", "add", "ann"], "is a folder, not a store file"),
        (tmp_path / "notes.txt", ["stats"], "not a usable preference store: file is not a"),
        (tmp_path / "notes.txt", ["annotator", "list"], "file is not a database"),
        (missing, ["stats"], "no such store"),
        (missing, ["annotator", "add", "ann"], f"folder {missing.parent} does not exist"),
    ]:
        err = _cli_error([*argv, "--store", str(store)], capsys)
        assert err.startswith(f"alignkit store: error: {store}: ") and cause in err
    assert not (tmp_path / "missing").exists()


def test_cli_export_checks_min_agreement_and_creates_the_out_folder(tmp_path, capsys):
    db = tmp_path / "s.db"
    with PreferenceStore(db) as s:
        [pair] = _pairs(s, 1)
        s.add_comparison(pair, "a", source="human", annotator="ann")
    for bad in ("5", "-0.1", "nan", "half"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli_main(["store", "export", "--store", str(db), "--out", "x", "--min-agreement", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--min-agreement" in err and repr(bad) in err
    out = tmp_path / "new" / "folder" / "out.jsonl"
    cli_main(["store", "export", "--store", str(db), "--out", str(out), "--min-agreement", "1"])
    assert out.read_text() == '{"prompt": "p0", "chosen": "good 0", "rejected": "bad 0"}\n'
    err = _cli_error(["export", "--store", str(db), "--out", str(tmp_path)], capsys)
    assert err.startswith("alignkit store: error: ") and str(tmp_path) in err


def test_cli_import_of_a_lone_surrogate_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "\\ud800", "response_a": "x", "response_b": "y"}\n')
    db = tmp_path / "s.db"
    err = _cli_error(["import", "--store", str(db), "--pairs", str(f)], capsys)
    assert err == (
        f"alignkit store: error: {f}:1: field 'prompt' is not valid Unicode text (a lone surrogate)"
    )
    # A name from a command line that is not UTF-8 (Python escapes its bytes as surrogates).
    err = _cli_error(["annotator", "add", "ann\udcff", "--store", str(db)], capsys)
    assert err == "alignkit store: error: NAME 'ann\\udcff' is not valid Unicode text"


# -- concurrency and crashes -----------------------------------------------------------------------

N_CONCURRENT = 150


def _label_everything(db, who, barrier, results):
    with PreferenceStore(db) as s:
        pair_ids = [r[0] for r in s._conn.execute("SELECT id FROM pairs ORDER BY id")]
        barrier.wait()
        inserted = 0
        for pid in pair_ids:
            # Both processes race to label as "shared"; each also labels as itself.
            inserted += s.add_comparison(pid, "a", source="human", annotator="shared") is not None
            s.add_comparison(pid, "b", source="human", annotator=who)
            s.add_comparison(pid, "tie", source="ai", annotator="judge")
        results.put(inserted)


def _annotate_until_done(db, who, barrier, results):
    with PreferenceStore(db) as s:
        barrier.wait()
        done = []
        while (a := s.next_pair_for(who)) is not None:
            s.submit(who, a.pair_id, "left")
            done.append(a.pair_id)
        results.put(done)


def _run_two(target, db, names):
    ctx = mp.get_context("spawn")  # no SQLite connection may cross a fork
    barrier, results = ctx.Barrier(len(names)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(db), name, barrier, results)) for name in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, "a writer process failed (its traceback is above)"
    return [results.get(timeout=5) for _ in procs]


def test_two_writer_processes_lose_and_duplicate_nothing(path):
    with PreferenceStore(path) as s:
        _pairs(s, N_CONCURRENT)
    inserted = _run_two(_label_everything, path, ["w1", "w2"])
    assert sum(inserted) == N_CONCURRENT  # each "shared" label landed exactly once
    with PreferenceStore(path) as s:
        counts = dict(
            s._conn.execute("SELECT annotator, count(*) FROM comparisons GROUP BY annotator")
        )
        assert counts == {
            "shared": N_CONCURRENT,
            "w1": N_CONCURRENT,
            "w2": N_CONCURRENT,
            "judge": 2 * N_CONCURRENT,
        }
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_annotator_processes_never_get_the_same_pair(path):
    with PreferenceStore(path) as s:
        pairs = _pairs(s, 60)
        s.add_annotator("ann")
        s.add_annotator("bob")
    done = _run_two(_annotate_until_done, path, ["ann", "bob"])
    assert sorted(done[0] + done[1]) == pairs  # labels_per_pair=1: every pair exactly once
    with PreferenceStore(path) as s:
        assert s.count("comparisons") == 60


def _die_inside_a_transaction(db, ready):
    s = PreferenceStore(db)
    with s.transaction():
        for i in range(50):
            pair = s.add_pair_from_texts(f"doomed {i}", "x", "y")
            s.add_comparison(pair, "a", source="human", annotator="ghost")
        ready.set()
        time.sleep(60)  # killed here, with the transaction open


def test_a_process_killed_mid_transaction_leaves_the_store_consistent(path):
    with PreferenceStore(path) as s:
        [pair] = _pairs(s, 1)
        s.add_comparison(pair, "a", source="human", annotator="ann")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_die_inside_a_transaction, args=(str(path), ready))
    child.start()
    assert ready.wait(timeout=60)
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    with PreferenceStore(path, timeout_s=5) as s:
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [s.count(t) for t in ("prompts", "pairs", "comparisons")] == [1, 1, 1]
        s.add_comparison(pair, "b", source="human", annotator="bob")  # the write lock is free
        assert s.count("comparisons") == 2
