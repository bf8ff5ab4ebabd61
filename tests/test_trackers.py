"""``report_to``: every stage's trackers, checked when its config is built, each read back from
what it wrote: TensorBoard's event file, MLflow's file store, W&B's offline run, trackio's
database."""

import glob
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from alignkit.config import ConfigError, build
from alignkit.data.sources import DataConfig
from alignkit.stages import ppo, sft
from alignkit.tracking import TRACKERS, Progress, Tracker, is_main_process, report_targets

STEPS = [(1, {"loss": 1.5, "kl_estimator": "k1", "stop": False}), (2, {"loss": 0.5, "stop": True})]


def sft_config(out_dir, **keys):
    return build(sft.Config, {"model": "m", "out_dir": str(out_dir), "data": {"train": "t.jsonl"},
                              **keys})


def log_run(out_dir, enabled=True, **keys) -> Tracker:
    cfg = sft_config(out_dir, **keys)
    tracker = Tracker(out_dir, cfg, enabled=enabled, stage="sft")
    tracker.progress(len(STEPS))
    for step, metrics in STEPS:
        tracker.log(step, metrics)
    tracker.finish({"loss": 0.5})
    return tracker


def test_report_to_is_checked_when_a_stage_config_is_built(tmp_path):
    assert sft_config(tmp_path).report_to == []                         # nothing extra by default
    for given, targets in ((["wandb", "mlflow"], ("wandb", "mlflow")), ("none", ()), ([], ()),
                           ("tensorboard,trackio", ("tensorboard", "trackio")),
                           ("WandB", ("wandb",))):
        assert report_targets(sft_config(tmp_path, report_to=given).report_to) == targets
    with pytest.raises(ConfigError, match=r"unknown tracker 'comet'; known: tensorboard, wandb, "
                                          r"mlflow, trackio \(or none\)"):
        sft_config(tmp_path, report_to=["wandb", "comet"])
    with pytest.raises(ConfigError, match="none cannot be combined"):
        sft_config(tmp_path, report_to=["none", "wandb"])
    data = DataConfig(train="t.jsonl")
    with pytest.raises(ConfigError, match="unknown tracker"):              # built in code too
        sft.Config(model="m", data=data, report_to="tensorbored")
    with pytest.raises(ConfigError, match="model is required"):         # the stage's own checks run
        sft.Config(data=data, report_to="wandb")
    assert list(TRACKERS) == ["tensorboard", "wandb", "mlflow", "trackio"]


def test_ppo_keeps_tensorboard_by_default_and_its_deprecated_key_maps_onto_report_to(tmp_path,
                                                                                     capsys):
    def targets(**keys):
        cfg = build(ppo.Config, {"model": "m", "reward": "gold:sentiment", "task": "sentiment",
                                 **keys})
        return report_targets(cfg.report_to, cfg.tensorboard)

    assert targets() == ("tensorboard",)
    assert targets(report_to="none") == ()
    assert targets(report_to=["wandb"]) == ("wandb",)
    assert targets(tensorboard=False) == ()
    assert targets(report_to=["wandb"], tensorboard=True) == ("wandb", "tensorboard")
    cfg = build(ppo.Config, {"model": "m", "reward": "gold:sentiment", "task": "sentiment",
                             "tensorboard": False, "out_dir": str(tmp_path)})
    Tracker(tmp_path, cfg, stage="ppo").finish({})
    assert "tensorboard is deprecated; this run reports to report_to=[]" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()


def test_a_tracker_whose_library_is_missing_names_report_to_and_the_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to names mlflow, which is not installed: "
                                          r"pip install mlflow-skinny"):
        Tracker(tmp_path, sft_config(tmp_path, report_to=["mlflow"]), enabled=True, stage="sft")


def test_only_the_main_process_writes_reports_and_prints(tmp_path, monkeypatch, capsys):
    from accelerate.state import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})   # no accelerate state set up yet
    monkeypatch.setenv("RANK", "1")                          # as torchrun sets it on rank 1
    assert not is_main_process()
    log_run(tmp_path, enabled=None)
    Progress(3, "sampling", every=0).update(3)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    log_run(tmp_path / "other", enabled=False, report_to="tensorboard")   # e.g. a stage's rank 1
    assert not (tmp_path / "other").exists()


def test_tensorboard_event_file_holds_the_numeric_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_run(tmp_path, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "stop"]           # strings are not scalars
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.5), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("stop")] == [(1, 0.0), (2, 1.0)]


def test_mlflow_file_store_holds_the_metrics_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    log_run(out, report_to=["mlflow"], project="alignkit-test")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("alignkit-test").experiment_id])
    assert run.info.run_name == f"sft {out}" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(1, 1.5), (2, 0.5)]
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model"] == "m"


def wandb_records(run_file: Path):
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of
    ``crc32 | length | type`` chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf = run_file.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                   # a block's tail too short for a header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                            # FULL or LAST chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline_run_in_the_run_folder_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    log_run(tmp_path, report_to="wandb", run_name="my run")
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, names = [], []
    for record in wandb_records(Path(run_file)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in record.history.item}
            history.append((row["_step"], row["loss"], row["stop"]))
        elif kind == "run":
            names.append((record.run.project, record.run.display_name))
        elif kind == "config":
            config = {"/".join(i.nested_key) or i.key: i.value_json for i in record.config.update}
            assert json.loads(config["optim.lr"]) == 0.001
    assert history == [(1, 1.5, 0), (2, 0.5, 1)] and ("alignkit", "my run") in names


def test_trackio_local_database_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    pytest.importorskip("trackio")
    import trackio.sqlite_storage

    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")  # read at import
    log_run(tmp_path / "run", report_to="trackio", project="proj")
    db = sqlite3.connect(tmp_path / "trackio" / "proj.db")
    rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    assert [(name, step, json.loads(m)["loss"]) for name, step, m in rows] == \
        [(f"sft {tmp_path / 'run'}", 1, 1.5), (f"sft {tmp_path / 'run'}", 2, 0.5)]
