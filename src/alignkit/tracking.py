"""Run folder bookkeeping: resolved config, ``metrics.jsonl`` per step, final ``metrics.json``.

Only the main process writes. Appends go through one open file and are flushed per line, so a
crash loses at most the line being written; on resume, lines past the checkpoint's step are
dropped so the log reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.config import save_config


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
        """Drop logged lines with ``step`` greater than ``step`` (used when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
            (self.out_dir / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            if self._tb is not None:
                self._tb.close()
        return final


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
