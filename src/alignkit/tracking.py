"""Run folder bookkeeping: what defines the run, resolved config, ``metrics.jsonl`` per step,
final ``metrics.json``.

Only the main process writes. Appends go through one open file and are flushed per line, so a
crash loses at most the line being written; on resume, lines past the checkpoint's step (and a
torn last line) are dropped so the log reads as one uninterrupted run. ``metrics.json`` is
written atomically and last: its presence means the stage finished.

``fingerprint.json`` records what defines a run (every setting that changes its result, and the
files it reads: content hashes, or size and modification time for large ones); a rerun in the
same folder with another fingerprint is refused, naming what differs, instead of silently
resuming the old run under the new settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, save_config, to_dict

# Settings that say where and how a run is recorded, not what it computes: a change of these
# resumes the same run. (A preference store is written during a run, so it is no input.)
OPERATIONAL = frozenset({"out_dir", "resume", "log_every", "save_every", "eval_every",
                         "keep_checkpoints", "tensorboard", "store"})
HASHED_BYTES = 64 << 20   # files up to this size are identified by content, larger by size+mtime


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Tracker:
    def __init__(self, out_dir: str | Path, cfg: Any = None, enabled: bool = True,
                 stage: str = "", tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.stage = stage
        self.start = time.time()
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg is not None:
            check_fingerprint(self.out_dir, cfg, record=True)
            save_config(cfg, self.out_dir / "config.yaml")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                print("alignkit: tensorboard is not installed; metrics go to metrics.jsonl only",
                      file=sys.stderr)

    @property
    def path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        """Drop logged lines with ``step`` greater than ``step``, and lines a crash left torn
        (called when a run starts or resumes: a run that starts at 0 keeps nothing)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) for row in _rows(self.path) if row.get("step", 0) <= step]
        _write_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)
        if echo:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "step")
            elapsed = time.time() - self.start
            print(f"[{self.stage} {elapsed:6.0f}s] step {step} {shown}", flush=True)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        final = {k: _clean(v) for k, v in metrics.items()}
        if self.enabled:
            _write_atomic(self.out_dir / "metrics.json", json.dumps(final, indent=2) + "\n")
            if self._tb is not None:
                self._tb.close()
        return final


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
_BOOKKEEPING = frozenset({"config.yaml", "fingerprint.json", "fingerprint.json.tmp", "tb"})


def _has_progress(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds anything a run would resume from or report: checkpoints,
    logged steps, outputs."""
    return any(p.name not in _BOOKKEEPING for p in out_dir.iterdir())


def check_fingerprint(out_dir: str | Path, cfg: Any, record: bool = False) -> None:
    """Refuse to go on in ``out_dir`` when it holds a run with another fingerprint, naming what
    differs and the ways on; ``record``: write this run's fingerprint (a run started afresh
    with ``resume=never`` is recorded over the old one)."""
    path = Path(out_dir) / "fingerprint.json"
    current = fingerprint(cfg)
    if path.exists() and _resumes(cfg) and _has_progress(Path(out_dir)):
        try:
            recorded = json.loads(path.read_text())
        except ValueError:
            recorded = {}
        changed = fingerprint_changes(recorded, current)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            ways = ("resume=never (start afresh here), " if "resume" in
                    {k.rsplit(".", 1)[-1] for k in _flatten(to_dict(cfg))} else "")
            raise ConfigError(f"{out_dir} holds a run with other settings or inputs ({shown}); "
                              f"refusing to resume it as this one. Use {ways}another out_dir, "
                              f"or --overwrite to delete the old run")
    if record:
        _write_atomic(path, json.dumps(current, indent=1) + "\n")
