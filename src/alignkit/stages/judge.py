"""``alignkit label-ai``: AI labels for response pairs (RLAIF), with their cost and agreement.

Reads the unlabelled pairs an ``alignkit label`` run wrote (``<pairs_dir>/pairs_<split>.jsonl``)
and has an AI judge (:mod:`alignkit.engine.judges`: a local model or any OpenAI-compatible
endpoint) label them, both orders averaged. Every judgement is recorded in the preference store
(source ``ai``, judge id, template version, rationale, cost, latency); every request is cached
there, so a re-run or a resumed run pays for nothing twice. Where ``<pairs_dir>/<split>.jsonl``
holds other labels of the same pairs (simulated annotators, or people), they are imported into
the store and the judge's agreement with them is measured on the shared pairs.

Output (the layout of ``alignkit label``, so ``rm`` and ``dpo`` read it unchanged):
``<out_dir>/<split>.jsonl`` preference records with ``label_prob`` (the soft label of the chosen
response), ``store.db``, ``unlabelled.jsonl`` (failed or unparseable pairs, with the reason) and
``metrics.json``: ``ai_agreement_with_<source>``, ``position_bias_rate``, ``cost_per_label``
($ from token counts and the configured prices), ``labels_per_second``, ...

``workers`` (``backend: local | ray``, :mod:`alignkit.engine.workers`): where the judge runs. On
Ray, a local judge model's batches (each a copy of the local batch) or an endpoint's requests
(in chunks, ``http.concurrency`` in flight per actor) go to ``workers.num`` actors; the labels
are the local backend's.

Needs ``--config``: a file with a shared ``judge:`` section and a ``label_ai:`` section (see
``configs/judge.yaml``), or a plain file of this stage's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignkit.config import require
from alignkit.engine.judges import JudgeConfig
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
    judge: JudgeConfig
    pairs_dir: str = ""               # folder with pairs_<split>.jsonl (an `alignkit label` run)
    splits: list[str] = field(default_factory=lambda: ["train", "eval"])
    out_dir: str = "runs/labels_ai"
    store: str = ""                   # default: <out_dir>/store.db
    reference_source: Literal["simulated", "human"] = "simulated"  # who labelled <split>.jsonl
    chunk: int = 256                  # pairs judged and committed to the store at a time
    limit: int = 0                    # > 0: only the first `limit` pairs of each split
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # where the judge runs: local | ray

    def __post_init__(self):
        require(bool(self.pairs_dir), "pairs_dir is required (the output folder of alignkit label)")
        require(self.chunk >= 1 and self.limit >= 0, "chunk must be >= 1 and limit >= 0")


def load(path: str, overrides: list[str]) -> Config:
    from alignkit.engine.judges import load_stage_config

    return load_stage_config(Config, path, "label_ai", overrides)


def main(cfg: Config) -> dict:
    from alignkit.engine.ai_labels import label_pair_files
    from alignkit.tracking import Tracker

    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, stage="label-ai")
    summary = label_pair_files(cfg.judge, cfg.pairs_dir, out, splits=cfg.splits,
                               store=cfg.store or out / "store.db",
                               reference_source=cfg.reference_source, chunk=cfg.chunk,
                               limit=cfg.limit, workers=cfg.workers)
    tracker.log(0, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    return tracker.finish(summary)


def summary_figures(summary: dict) -> list:
    """Pipeline report figures: how often the AI label matches the
    simulated one as a function of the judge's confidence (a calibrated judge rises from 0.5 at
    confidence 0.5 to 1 at confidence 1), and the gold pair accuracy of reward models trained on
    simulated vs AI labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignkit.data.io import read_jsonl

    out: list = []
    ai, sim = summary.get("label_ai") or {}, summary.get("label") or {}
    ai_path, sim_path = Path(str(ai.get("train", ""))), Path(str(sim.get("train", "")))
    if ai_path.is_file() and sim_path.is_file():
        sim = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))): r["chosen"]
               for r in read_jsonl(sim_path)}
        hits = [(r["label_prob"], sim[k] == r["chosen"]) for r in read_jsonl(ai_path)
                if (k := (r["prompt"], frozenset((r["chosen"], r["rejected"])))) in sim]
        edges = [0.5 + 0.05 * i for i in range(11)]
        centres, rates, counts = [], [], []
        for lo, hi in zip(edges, edges[1:]):
            inside = [agree for p, agree in hits if lo <= p < hi or (hi == 1.0 and p == 1.0)]
            if inside:
                centres.append((lo + hi) / 2)
                rates.append(sum(inside) / len(inside))
                counts.append(len(inside))
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([0.5, 1.0], [0.5, 1.0], ls="--", color="grey", label="calibrated")
        ax.scatter(centres, rates, s=[8 + 200 * c / max(counts) for c in counts], label="AI judge")
        ax.set_xlabel("AI soft label of its chosen response")
        ax.set_ylabel("agreement with simulated label")
        ax.legend()
        out.append(("AI labels vs simulated labels", fig))
    rms = {name: summary[key]["gold_pair_accuracy"] for name, key in
           (("simulated labels", "rm"), ("AI labels", "rm@ai"))
           if isinstance(summary.get(key), dict) and "gold_pair_accuracy" in summary[key]}
    if rms:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(list(rms), list(rms.values()), color=["tab:blue", "tab:orange"][:len(rms)])
        ax.axhline(0.5, ls="--", color="grey")
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("reward model gold pair accuracy")
        out.append(("Reward models: simulated vs AI labels", fig))
    return out
