"""Run folder bookkeeping: what defines the run, resolved config, ``metrics.jsonl`` per step,
final ``metrics.json``; the trackers a run also reports to (``report_to``); and the progress
of long loops (steps done of the total, and the time left).

Only the main process writes. Appends go through one open file and are flushed per line, so a
crash loses at most the line being written; on resume, lines past the checkpoint's step (and a
torn last line) are dropped so the log reads as one uninterrupted run. ``metrics.json`` is
written atomically and last: its presence means the stage finished.

``fingerprint.json`` records what defines a run (every setting that changes its result, and the
files it reads: content hashes, or size and modification time for large ones); a rerun in the
same folder with another fingerprint is refused, naming what differs, instead of silently
resuming the old run under the new settings.

Trackers (``report_to``) go through accelerate's tracker classes (``accelerate.tracking``), not
each library's own API: they are the integrations accelerate's users already run (MLflow's
parameter batching and MLFLOW_* variables, TensorBoard's hparams), accelerate is a dependency
already, and each further tracker it has (comet_ml, aim, clearml, dvclive, swanlab) is one entry
in :data:`TRACKERS`. They are built directly rather than through ``Accelerator(log_with=...)``:
not every stage has an Accelerator, and a run folder owns its trackers (one tracker run per
stage run, started and finished with it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, TextIO

from alignkit.config import ConfigError, save_config, to_dict
from alignkit.data.io import write_text_atomic

# Settings that say where and how a run is recorded, not what it computes: a change of these
# resumes the same run. (A preference store is written during a run, so it is no input.)
OPERATIONAL = frozenset({"out_dir", "resume", "log_every", "save_every", "eval_every",
                         "keep_checkpoints", "tensorboard", "store", "report_to", "run_name",
                         "project"})
HASHED_BYTES = 64 << 20   # files up to this size are identified by content, larger by size+mtime
# Counts of independent rounds or steps, each saved whole before the next starts: a larger
# value continues the same run (online DPO's rounds, ReST's Grow steps).
EXTENDS = frozenset({"online.rounds", "grow_steps"})


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Trackers: where a run reports besides its own folder (see the module docstring for why
# accelerate's).


class TrackerKind(NamedTuple):
    package: str                                  # what `pip install` needs
    module: str                                   # what must import
    make: Callable[[Path, str, str], Any]         # (out_dir, project, run_name) -> GeneralTracker


def _tensorboard(out_dir: Path, project: str, run_name: str):
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker("tb", out_dir)     # <out_dir>/tb, as before report_to


def _wandb(out_dir: Path, project: str, run_name: str):
    from accelerate.tracking import WandBTracker

    # accelerate's first argument is W&B's project. WANDB_DIR, where set, wins over the run folder.
    where = {} if os.environ.get("WANDB_DIR") else {"dir": str(out_dir)}
    return WandBTracker(project, name=run_name, **where)


def _mlflow(out_dir: Path, project: str, run_name: str):
    from accelerate.tracking import MLflowTracker

    # The store is MLflow's own setting (MLFLOW_TRACKING_URI), as for any MLflow user.
    return MLflowTracker(experiment_name=project, run_name=run_name)


def _trackio(out_dir: Path, project: str, run_name: str):
    from accelerate.tracking import TrackioTracker

    return TrackioTracker(project, name=run_name)


# The one registry of trackers: report_to's names, and every list of them, come from here.
TRACKERS: dict[str, TrackerKind] = {
    "tensorboard": TrackerKind("tensorboard", "tensorboard", _tensorboard),
    "wandb": TrackerKind("wandb", "wandb", _wandb),
    "mlflow": TrackerKind("mlflow-skinny", "mlflow", _mlflow),
    "trackio": TrackerKind("trackio", "trackio", _trackio),
}

_HINTS = {"mlflow": " (MLflow logs where MLFLOW_TRACKING_URI points: a server, http://...; or a "
                    "folder, file:./mlruns, with MLFLOW_ALLOW_FILE_STORE=true; the full mlflow "
                    "package adds the default sqlite:///mlflow.db)",
          "wandb": " (WANDB_MODE=offline logs without an account)"}


def report_targets(report_to: list[str] | str, tensorboard: bool | None = None) -> tuple[str, ...]:
    """The trackers ``report_to`` names: a list, one name, ``"a,b"``, or ``none`` / ``[]``.
    ``tensorboard``: ppo's deprecated key (true adds TensorBoard, false drops it; None: unset).
    An unknown name is a :class:`ConfigError` naming the known ones."""
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip()]
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"report_to: none cannot be combined with trackers ({report_to!r})")
        names = []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}; known: "
                              f"{', '.join(TRACKERS)} (or none)")
    if tensorboard is not None:
        names = [n for n in names if n != "tensorboard"] + (["tensorboard"] if tensorboard else [])
    return tuple(dict.fromkeys(names))


def _targets_of(cfg: Any) -> tuple[str, ...]:
    if cfg is None or not hasattr(cfg, "report_to"):
        return ()
    return report_targets(cfg.report_to, getattr(cfg, "tensorboard", None))


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """The keys every stage's ``Config`` has by subclassing this (``class Config(TrackingConfig)``):
    where its :class:`Tracker` reports. Keyword-only, so a stage's own fields keep their order.

    ``report_to`` is checked when the config is built, also where a stage's ``__post_init__``
    does not call this one (``__init_subclass__`` chains them)."""

    report_to: list[str] | str = field(default_factory=list)  # tensorboard, wandb, mlflow, trackio; none
    run_name: str = ""             # the run's name in the trackers (default: "<stage> <out_dir>")
    project: str = "alignkit"      # W&B / trackio project, MLflow experiment

    def __post_init__(self):
        _targets_of(self)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and own is not TrackingConfig.__post_init__:
            @functools.wraps(own)
            def __post_init__(self):
                TrackingConfig.__post_init__(self)
                own(self)

            cls.__post_init__ = __post_init__


def is_main_process() -> bool:
    """Whether this process logs and prints: rank 0 of a multi-process run (accelerate's state
    where it has been set up, else the RANK that torchrun and ``accelerate launch`` set)."""
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        return state.PartialState().is_main_process
    return int(os.environ.get("RANK", "0") or 0) == 0


def _params(cfg: Any) -> dict[str, Any]:
    """The config as flat ``section.key`` -> scalar (what every tracker takes as parameters)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in _flatten(to_dict(cfg)).items()}


class Tracker:
    """A run's log: ``metrics.jsonl`` (and ``metrics.json`` at the end) in ``out_dir``, the trackers
    ``cfg.report_to`` names (or ``report_to``, which wins), and the echo of each logged step.
    Only the main process writes and prints (``enabled``; default: :func:`is_main_process`).

    A resumed run starts a new run in W&B / MLflow / trackio under the same name, logging from
    the checkpoint's step on (W&B's WANDB_RUN_ID + WANDB_RESUME=allow, MLflow's MLFLOW_RUN_ID
    continue one instead)."""

    def __init__(self, out_dir: str | Path, cfg: Any = None, enabled: bool | None = None,
                 stage: str = "", report_to: list[str] | str | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = is_main_process() if enabled is None else enabled
        self.stage = stage
        self.start = time.time()
        self._trackers: list = []
        self._progress: Progress | None = None
        names = _targets_of(cfg) if report_to is None else report_targets(report_to)
        if names:
            missing = [n for n in names if importlib.util.find_spec(TRACKERS[n].module) is None]
            if missing:
                pkgs = " ".join(TRACKERS[n].package for n in missing)
                raise ConfigError(f"report_to names {', '.join(missing)}, which is not installed: "
                                  f"pip install {pkgs} (or drop it from report_to)")
            from accelerate.state import PartialState

            # accelerate's trackers log through its state; every process sets it up (in a
            # multi-process run all of them together), though only the main one reports.
            PartialState()
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg is not None:
            check_fingerprint(self.out_dir, cfg, record=True)
            save_config(cfg, self.out_dir / "config.yaml")
        if getattr(cfg, "tensorboard", None) is not None and report_to is None:
            print(f"alignkit: the key tensorboard is deprecated; this run reports to "
                  f"report_to={list(names)}: set that instead", file=sys.stderr, flush=True)
        if names:
            self._start_trackers(names, cfg)

    def _start_trackers(self, names: tuple[str, ...], cfg: Any) -> None:
        project = getattr(cfg, "project", "") or "alignkit"
        run_name = getattr(cfg, "run_name", "") or f"{self.stage} {self.out_dir}".strip()
        params = _params(cfg) if cfg is not None else {}
        for name in names:
            try:
                tracker = TRACKERS[name].make(self.out_dir, project, run_name)
                tracker.start()
                if params:
                    tracker.store_init_configuration(params)
            except ConfigError:
                raise
            except Exception as exc:   # a tracker's own failure, e.g. no store or no login
                self._finish_trackers()
                raise ConfigError(f"report_to {name}: could not start: {exc}"
                                  f"{_HINTS.get(name, '')}") from exc
            self._trackers.append(tracker)

    @property
    def path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def progress(self, total: int, done: int = 0, unit: str = "step") -> Progress:
        """Count this run's loop: ``done`` of ``total`` (a resumed run starts past 0). Log lines
        then show ``step 5/120`` and the time left; on a terminal a bar counts each step
        (:meth:`Progress.to`), elsewhere the log lines are the progress."""
        self._progress = Progress(total, self.stage, unit, done=done, enabled=self.enabled,
                                  lines=False)
        return self._progress

    def truncate_after(self, step: int) -> None:
        """Drop logged lines with ``step`` greater than ``step``, and lines a crash left torn
        (called when a run starts or resumes: a run that starts at 0 keeps nothing)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) for row in _rows(self.path) if row.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        numbers = {k: int(v) if isinstance(v, bool) else v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(numbers, step=step)
        progress = self._progress
        if progress is not None and step > progress.done:
            progress.to(step)
        if echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "step")
            elapsed = time.time() - self.start
            at = f"step {step}" if progress is None else f"step {step}/{progress.total}"
            eta = progress.eta() if progress is not None else None
            at += f" eta {format_duration(eta)}" if eta is not None else ""
            line = f"[{self.stage} {elapsed:6.0f}s] {at} {shown}"
            if progress is not None:
                progress.write(line)
            else:
                print(line, flush=True)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        final = {k: _clean(v) for k, v in metrics.items()}
        if self._progress is not None:
            self._progress.close()
        if self.enabled:
            write_text_atomic(self.out_dir / "metrics.json", json.dumps(final, indent=2) + "\n")
            self._finish_trackers()
        return final

    def _finish_trackers(self) -> None:
        while self._trackers:
            self._trackers.pop().finish()


# ---------------------------------------------------------------------------------------------
# Progress of long loops.


def format_duration(seconds: float) -> str:
    """``42s``, ``1m20s``, ``2h03m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``done`` of ``total`` units of a loop, its rate and the time left (ETA), on the main
    process only (``enabled``; default: :func:`is_main_process`).

    Where ``stream`` (stderr) is a terminal, a tqdm bar (the outermost one stays when done);
    elsewhere (CI, a file) plain lines without carriage returns: at most one per ``every``
    seconds and one at the end (``lines=False``: none, where log lines carry the progress).
    Nothing shows before the loop has run ``delay`` seconds, so short loops stay quiet. The
    ETA is measured on the units done since this object started (a resumed run's earlier
    steps do not count)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, done: int = 0,
                 enabled: bool | None = None, lines: bool = True, delay: float = 0.0,
                 every: float = 30.0, stream: TextIO | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self._start_done = done
        self.enabled = is_main_process() if enabled is None else enabled
        self.lines, self.delay, self.every = lines, delay, every
        self.stream = sys.stderr if stream is None else stream
        self.closed = False
        self._t0 = time.time()
        self._printed_at: float | None = None
        self._bar = None
        if self.enabled and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=self.stream,
                             delay=delay, leave=None, dynamic_ncols=True)

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before the first unit."""
        n = self.done - self._start_done
        if n <= 0:
            return None
        return (time.time() - self._t0) / n * max(self.total - self.done, 0)

    def update(self, n: int = 1) -> None:
        self.to(self.done + n)

    def to(self, done: int) -> None:
        """Set the units done (a step counter)."""
        if self.closed or done == self.done:
            return
        self._bar_update(done - self.done)
        self.done = done
        if self._bar is None and self.enabled and self.lines:
            now = time.time()
            if self._printed_at is None:
                due = now - self._t0 >= self.delay
            else:
                due = now - self._printed_at >= self.every or done >= self.total
            if due:
                self._printed_at = now
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        eta = self.eta()
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return (f"[{self.desc} {time.time() - self._t0:6.0f}s] {self.done}/{self.total} "
                f"{self.unit}{share}" + (f" eta {format_duration(eta)}" if eta is not None else ""))

    def write(self, line: str, file: TextIO | None = None) -> None:
        """Print ``line`` (stdout) without breaking the bar."""
        if self._bar is not None and not self.closed:
            self._bar.write(line, file=file or sys.stdout)
        else:
            print(line, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if not self.closed and self._bar is not None:
            self._bar.close()
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _bar_update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a torn line left by a crash is skipped)."""
    path = Path(out_dir) / "metrics.jsonl"
    return _rows(path) if path.exists() else []


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue   # a line cut short by a kill: never a whole step
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# What defines a run.


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _file_id(path: Path) -> str:
    """Content hash of a file (size and modification time past ``HASHED_BYTES``)."""
    stat = path.stat()
    if stat.st_size > HASHED_BYTES:
        return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256=" + digest.hexdigest()


def _input_ids(value: str, own: Path | None = None) -> dict[str, str] | None:
    """Identity of the files a setting names: a path, or ``KIND:PATH`` (``model:``, ``judge:``,
    ...); a folder by each of its files. None when the value names no local file, or one inside
    ``own``, the run's own folder: that is what the run writes (e.g. ``judge.model`` of
    ``judge-model`` names its output), no input, and it appears while the run goes on."""
    for candidate in (value, value.partition(":")[2]):
        path = Path(candidate) if candidate else None
        if path is None or not path.exists():
            continue
        if own is not None and (path.resolve() == own or own in path.resolve().parents):
            return None
        if path.is_file():
            return {".": _file_id(path)}
        files = sorted(f for f in path.rglob("*") if f.is_file() and "checkpoints" not in f.parts)
        return {str(f.relative_to(path)): _file_id(f) for f in files}
    return None


def fingerprint(cfg: Any) -> dict:
    """``{"settings": ..., "inputs": ...}``: every setting of ``cfg`` but the operational ones,
    and the identity of each local file or folder a setting names outside the run's own folder."""
    flat = _flatten(to_dict(cfg))
    settings = {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in OPERATIONAL}
    own = Path(flat["out_dir"]).resolve() if isinstance(flat.get("out_dir"), str) else None
    inputs = {k: ids for k, v in settings.items()
              if isinstance(v, str) and (ids := _input_ids(v, own)) is not None}
    return json.loads(json.dumps({"settings": settings, "inputs": inputs}, default=str))


def fingerprint_changes(recorded: dict, current: dict) -> list[str]:
    """The settings and inputs that differ between two fingerprints (``inputs:KEY`` for a file
    or folder whose content changed)."""
    changed = []
    for part, prefix in (("settings", ""), ("inputs", "inputs:")):
        old, new = recorded.get(part, {}), current.get(part, {})
        changed += [prefix + k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return changed


def _resumes(cfg: Any) -> bool:
    """Whether any ``resume`` setting of ``cfg`` lets it resume (all but ``never``)."""
    return all(v != "never" for k, v in _flatten(to_dict(cfg)).items()
               if k.rsplit(".", 1)[-1] == "resume")


# What a run folder holds before its run has done anything (a start that failed early).
_BOOKKEEPING = frozenset({"config.yaml", "fingerprint.json", "fingerprint.json.tmp", "tb",
                          "wandb"})


def _has_progress(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds anything a run would resume from or report: checkpoints,
    logged steps, outputs."""
    return any(p.name not in _BOOKKEEPING for p in out_dir.iterdir())


def check_fingerprint(out_dir: str | Path, cfg: Any, record: bool = False) -> bool:
    """Refuse to go on in ``out_dir`` when it holds a run with another fingerprint, naming what
    differs and the ways on; ``record``: write this run's fingerprint (a run started afresh
    with ``resume=never`` is recorded over the old one). Returns whether the run goes on
    further than the recorded one (a larger count of :data:`EXTENDS`)."""
    path = Path(out_dir) / "fingerprint.json"
    current = fingerprint(cfg)
    extended = False
    if path.exists() and _resumes(cfg) and _has_progress(Path(out_dir)):
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = {}
        changed = fingerprint_changes(recorded, current)
        old = recorded.get("settings", {})
        grown = [k for k in changed if k in EXTENDS and isinstance(old.get(k), int)
                 and current["settings"][k] > old[k]]
        changed, extended = [k for k in changed if k not in grown], bool(grown)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            ways = ("resume=never (start afresh here), " if "resume" in
                    {k.rsplit(".", 1)[-1] for k in _flatten(to_dict(cfg))} else "")
            raise ConfigError(f"{out_dir} holds a run with other settings or inputs ({shown}); "
                              f"refusing to resume it as this one. Use {ways}another out_dir, "
                              f"or --overwrite to delete the old run")
    if record:
        write_text_atomic(path, json.dumps(current, indent=1) + "\n")
    return extended
