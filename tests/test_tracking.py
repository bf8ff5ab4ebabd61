"""Run folder bookkeeping: torn and repeated metric lines after a crash, and the fingerprint that
refuses to resume a run under other settings or inputs."""

import io
import json
from dataclasses import dataclass, field

import pytest

from alignkit.config import ConfigError, build
from alignkit.tracking import (Progress, Tracker, check_fingerprint, fingerprint, format_duration,
                               read_metrics)


def test_a_torn_last_line_is_dropped_on_read_and_on_resume(tmp_path):
    t = Tracker(tmp_path, stage="t")
    for step in (1, 2, 3):
        t.log(step, {"loss": 1.0 / step}, echo=False)
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "loss": 0.2')            # a kill in the middle of a write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    t.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')


def test_a_run_that_starts_at_zero_keeps_no_earlier_line(tmp_path):
    """A kill before the first checkpoint: the restarted run logs steps 1.. once, not twice."""
    t = Tracker(tmp_path, stage="t")
    for step in (1, 2, 3):
        t.log(step, {"loss": 1.0}, echo=False)
    t.truncate_after(0)                                  # what resume() does with no checkpoint
    for step in (1, 2):
        t.log(step, {"loss": 2.0}, echo=False)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 2.0)]


@dataclass(frozen=True)
class Train:
    lr: float = 0.1
    resume: str = "auto"
    log_every: int = 10


@dataclass(frozen=True)
class Run:
    model: str = ""
    out_dir: str = "runs/x"
    train: Train = field(default_factory=Train)


def test_the_fingerprint_names_what_changed_and_the_ways_on(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a"}\n')
    out = tmp_path / "run"
    first = build(Run, {"model": str(data), "out_dir": str(out)})
    changed = build(Run, {"model": str(data), "out_dir": str(out), "train": {"lr": 0.2}})
    Tracker(out, first)
    Tracker(out, changed)      # a start that failed before doing anything blocks nothing
    Tracker(out, first).log(1, {"loss": 1.0}, echo=False)
    written = (out / "config.yaml").read_text()
    # operational settings (logging, where to write) resume the same run
    Tracker(out, build(Run, {"model": str(data), "out_dir": str(out), "train": {"log_every": 1}}))
    with pytest.raises(ConfigError, match=r"\(train\.lr\).*resume=never .*another out_dir, or "
                                          r"--overwrite"):
        Tracker(out, changed)
    assert "lr: 0.2" not in (out / "config.yaml").read_text()
    data.write_text('{"prompt": "b"}\n')                # same path, other content
    with pytest.raises(ConfigError, match=r"\(inputs:model\)"):
        check_fingerprint(out, first)
    # resume=never starts afresh and records the new run
    fresh = build(Run, {"model": str(data), "out_dir": str(out), "train": {"lr": 0.2, "resume": "never"}})
    Tracker(out, fresh)
    assert json.loads((out / "fingerprint.json").read_text()) == fingerprint(fresh)
    assert written != (out / "config.yaml").read_text()


def test_a_folder_input_is_identified_by_each_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"\0" * 10)
    ids = fingerprint(build(Run, {"model": f"model:{model}"}))["inputs"]["model"]
    assert sorted(ids) == ["config.json", "weights.bin"]
    assert ids["weights.bin"].startswith("sha256=")


def test_a_setting_that_names_the_runs_own_output_is_no_input(tmp_path):
    """judge-model's judge.model names its own output (configs/judge.yaml): the model appearing
    in the run folder (a run killed after saving it) is no changed input."""
    out = tmp_path / "run"
    cfg = build(Run, {"model": str(out / "model"), "out_dir": str(out)})
    Tracker(out, cfg).log(1, {"loss": 1.0}, echo=False)
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"\0")
    assert fingerprint(cfg)["inputs"] == {}
    Tracker(out, cfg)                                    # resumes


# ---------------------------------------------------------------------------------------------
# Progress: steps done of the total and the time left, plain lines off a terminal.


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    import alignkit.tracking as tracking

    c = Clock()
    monkeypatch.setattr(tracking, "time", c)
    return c


def test_log_lines_show_the_step_of_the_total_and_the_time_left(tmp_path, clock, capsys):
    t = Tracker(tmp_path, stage="sft", enabled=True)
    t.progress(120, done=20)                # resumed at step 20: its steps are not timed
    clock.now += 8
    t.log(25, {"loss": 0.5})                # 5 steps in 8 s: 95 left take 152 s
    clock.now += 8
    t.log(30, {"loss": 0.25})
    out = capsys.readouterr()
    assert out.out.splitlines() == ["[sft      8s] step 25/120 eta 2m32s loss=0.5",
                                    "[sft     16s] step 30/120 eta 2m24s loss=0.25"]
    assert out.err == ""                    # off a terminal the log lines are the progress
    t.finish({})
    Tracker(tmp_path / "b", stage="evaluate", enabled=True).log(0, {"gold": 1.0})
    assert capsys.readouterr().out == "[evaluate      0s] step 0 gold=1\n"   # no total: as before


def test_plain_progress_lines_at_most_every_interval_and_at_the_end(clock):
    stream = io.StringIO()
    p = Progress(1000, "label-ai", "pairs", every=30, stream=stream)
    for _ in range(10):                      # 100 pairs per 10 s
        clock.now += 10
        p.update(100)
    assert stream.getvalue().splitlines() == [
        "[label-ai     10s] 100/1000 pairs (10%) eta 1m30s",
        "[label-ai     40s] 400/1000 pairs (40%) eta 1m00s",
        "[label-ai     70s] 700/1000 pairs (70%) eta 30s",
        "[label-ai    100s] 1000/1000 pairs (100%) eta 0s"]
    assert "\r" not in stream.getvalue()
    quiet = io.StringIO()
    p = Progress(4, "sampling", "rows", delay=10, stream=quiet)   # done within its delay: silent
    clock.now += 9
    p.update(4)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_a_bar_with_the_total(clock):
    stream = Terminal()
    with Progress(40, "ppo", "iteration", stream=stream, enabled=True) as p:
        p.to(10)
    assert "\r" in stream.getvalue() and "10/40" in stream.getvalue()


def test_durations_read_at_a_glance():
    assert [format_duration(s) for s in (0, 42.4, 80, 3599, 7380)] == [
        "0s", "42s", "1m20s", "59m59s", "2h03m"]
