"""The HTML report of a pipeline run or of a stage run on its own: headline table, training
curves, the stages' own figures, samples.

Self-contained (plots inlined as PNG), so the file can be mailed or attached to an issue.
A stage module contributes its own plots with ``figures(run_dir) -> [(title, Figure)]`` (drawn
from that run's files) and, for plots that compare stages, ``summary_figures(summary)``. A stage
run on its own (``alignkit ppo ...``) gets the same per-stage section in its own report.html.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from types import ModuleType
from typing import Any

from alignkit.tracking import read_metrics

# Curves worth plotting per stage when present in metrics.jsonl.
CURVES = ["loss", "eval/loss", "accuracy", "eval/pair_accuracy", "eval/gold_pair_accuracy",
          "rewards/margin", "rewards/accuracy", "eval/gold_reward_mean", "eval/kl_to_ref",
          "proxy_reward_mean", "gold_reward_mean", "kl_to_ref", "kl", "margin", "beta"]

# The columns of a headline table, in this order, where some stage reports them.
HEADLINE = ["gold_reward_mean", "gold_reward_sem", "kl_to_ref", "proxy_reward_mean",
            "win_rate_mean", "gold_success_mean", "train_loss", "eval_loss", "pair_accuracy",
            "gold_pair_accuracy", "rewards/accuracy", "rewards/margin",
            "ai_agreement_with_simulated", "position_bias_rate", "cost_per_label", "steps"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def stage_curves(stage: str, rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if sum(r.get(k) is not None for r in rows) >= 2]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _table(summary: dict[str, Any]) -> str:
    """Stages as rows, the headline metrics any of them reports as columns."""
    stages = {k: m for k, m in summary.items() if isinstance(m, dict)}
    columns = [c for c in HEADLINE if any(_numeric(m.get(c)) for m in stages.values())]
    head = "<tr><th>stage</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
    rows = [f"<tr><td><b>{html.escape(name)}</b></td>"
            + "".join(f"<td>{_fmt(m[c]) if _numeric(m.get(c)) else ''}</td>" for c in columns)
            + "</tr>" for name, m in stages.items()]
    return "<table>" + head + "".join(rows) + "</table>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    """One run's final metrics, one per row: the headline ones first."""
    keys = [k for k in HEADLINE if k in metrics] + [k for k in metrics if k not in HEADLINE]
    rows = [f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(metrics[k]))}</td></tr>"
            for k in keys if _numeric(metrics[k]) or (isinstance(metrics[k], str)
                                                      and len(metrics[k]) < 80)]
    return "<table><tr><th>metric</th><th>value</th></tr>" + "".join(rows) + "</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _samples(path: Path, n: int = 6) -> str:
    if not path.exists():
        return ""
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    items = []
    for r in rows:
        scores = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if _numeric(v))
        items.append(f"<li><code>{html.escape(r['prompt'])}</code> → "
                     f"{html.escape(r['response'])} <small>({scores})</small></li>")
    return "<ul>" + "".join(items) + "</ul>"


def frontier_figure(summary: dict):
    """Gold reward against KL to the SFT model, one point per policy stage (with its standard
    error over test prompts): the reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023,
    fig. 2), on our task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(name, m) for name, m in summary.items()
              if not name.startswith("evaluate") and isinstance(m, dict)
              and m.get("gold_reward_mean") is not None and m.get("kl_to_ref") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, m in points:
        ax.errorbar(m["kl_to_ref"], m["gold_reward_mean"], yerr=m.get("gold_reward_sem", 0),
                    fmt="o", capsize=3)
        ax.annotate(name, (m["kl_to_ref"], m["gold_reward_mean"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel("gold reward (mean over test prompts)")
    ax.grid(alpha=0.3)
    return fig


def _img(title: str, fig, level: int = 2) -> str:
    return f"<h{level}>{html.escape(title)}</h{level}><img src='data:image/png;base64,{_png(fig)}'>"


def stage_section(name: str, module: ModuleType | None, run_dir: Path) -> list[str]:
    """Training curves, the stage's own figures and a few samples of one stage's run folder."""
    parts = []
    rows = read_metrics(run_dir)
    fig = stage_curves(name, rows) if rows else None
    if fig is not None:
        parts.append(_img(name, fig))
    for title, extra in getattr(module, "figures", lambda _: [])(run_dir):
        parts.append(_img(f"{name}: {title}", extra, level=3))
    samples = _samples(run_dir / "samples.jsonl")
    if samples:
        parts.append(f"<h3>Samples ({html.escape(name)})</h3>{samples}")
    return parts


def _page(path: Path, title: str, parts: list[str]) -> Path:
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:13px;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}li{margin:4px 0}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
                    f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return path


def write_report(out_dir: Path, summary: dict, stages: dict[str, tuple[ModuleType, Any]]) -> Path:
    """The pipeline's report: headline table, the gold-vs-KL frontier, cross-stage figures, then
    one section per stage (``stages``: name -> (module, its config with ``out_dir``))."""
    parts = [f"<h1>alignkit run: {html.escape(str(out_dir))}</h1>",
             "<h2>Headline metrics</h2>", _table(summary)]
    frontier = frontier_figure(summary)
    if frontier is not None:
        parts.append(_img("Gold reward vs KL to the SFT model", frontier))
    modules = list({id(m): m for m, _ in stages.values()}.values())
    for module in modules:
        for title, fig in getattr(module, "summary_figures", lambda _: [])(summary):
            parts.append(_img(title, fig))
    for name, (module, cfg) in stages.items():
        parts += stage_section(name, module, Path(cfg.out_dir))
    return _page(Path(out_dir) / "report.html", "alignkit report", parts)


def run_title(name: str, metrics: dict) -> str:
    """What ran: the stage, or its algorithm (``grpo``, not ``ppo``) and loss (``dpo (ipo)``)."""
    if isinstance(metrics.get("algo"), str):
        return metrics["algo"]
    if isinstance(metrics.get("loss"), str):
        return f"{name} ({metrics['loss']})"
    return name


def write_stage_report(name: str, module: ModuleType, run_dir: Path, metrics: dict) -> Path:
    """report.html of a stage run on its own: its final metrics as a table, curves, its own
    figures and a few samples, titled by what ran."""
    title = f"alignkit {run_title(name, metrics)}"
    parts = [f"<h1>{html.escape(title)}: {html.escape(str(run_dir))}</h1>",
             "<h2>Final metrics</h2>", _metrics_table(metrics),
             *stage_section(run_title(name, metrics), module, Path(run_dir))]
    return _page(Path(run_dir) / "report.html", title, parts)
