"""AI labels for files of response pairs (RLAIF; Lee et al. 2023): judge, record, measure.

Reads the unlabelled pairs ``<pairs_dir>/pairs_<split>.jsonl`` (an ``alignkit label`` run) and has
a pairwise AI judge (:mod:`alignkit.engine.judges`) label them, both orders averaged, chunk by
chunk. Every judgement goes to the preference store, which also answers repeated requests (a
re-run pays for nothing twice). Where ``<pairs_dir>/<split>.jsonl`` holds other labels of the same
pairs (simulated annotators or people), they are imported too and the judge's agreement with
them is measured on the shared pairs. The judge runs where ``workers`` say (in this process, or
its batches / requests on Ray actors: :mod:`alignkit.engine.workers`), with the same labels.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignkit.data.io import read_jsonl, write_jsonl
from alignkit.data.store import PreferenceStore
from alignkit.engine.judges import (JudgeConfig, PairwiseJudge, agreement, make_backend,
                                    position_bias_rate, preference_record)
from alignkit.tracking import Progress


def label_split(judge, pairs: list[dict], chunk: int) -> tuple[list, list[dict], list[dict]]:
    """Judge ``pairs`` chunk by chunk; returns the judgements, preference records of the
    decided pairs, and the unlabelled pairs with the reason."""
    judgements, records, unlabelled = [], [], []
    progress = Progress(len(pairs), "label-ai", "pairs", every=0.0)   # a line per chunk
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        got = judge.label([p["prompt"] for p in part], [p["response_a"] for p in part],
                          [p["response_b"] for p in part])
        judgements += got
        for p, j in zip(part, got):
            record = preference_record(p["prompt"], p["response_a"], p["response_b"], j)
            if record is not None:
                records.append(record)
            elif j.label is None:
                errors = [o.error for o in j.outcomes if o.error]
                answers = [o.raw["answer"] for o in j.outcomes if o.raw is not None]
                unlabelled.append({**p, "reason": "failed" if errors else "unparseable",
                                   "errors": errors, "answers": answers})
        progress.update(len(part))
    progress.close()
    return judgements, records, unlabelled


def label_pair_files(judge_cfg: JudgeConfig, pairs_dir: str | Path, out_dir: str | Path, *,
                     splits: list[str], store: str | Path, reference_source: str,
                     chunk: int = 256, limit: int = 0, workers=None) -> dict:
    """Label every split's pairs into ``<out_dir>/<split>.jsonl`` (preference records with the
    judge's soft label) and ``unlabelled.jsonl`` (failed or unparseable pairs, with the reason);
    returns the summary: agreement and kappa with ``reference_source``, position-bias rate, cost
    per label, labels per second, request and token counts. ``limit`` > 0: the first pairs only;
    ``workers`` (a ``WorkersConfig``, None: this process): where the judge runs."""
    out, pairs_dir = Path(out_dir), Path(pairs_dir)
    with PreferenceStore(store) as db:
        judge = PairwiseJudge(judge_cfg, backend=make_backend(judge_cfg, workers), store=db)
        summary: dict = {"judge": judge.id, "template_version": judge.template_version}
        everything, unlabelled = [], []
        start = time.perf_counter()
        for split in splits:
            pairs = read_jsonl(pairs_dir / f"pairs_{split}.jsonl")[:limit or None]
            _enter(db, pairs, pairs_dir / f"{split}.jsonl", reference_source)
            judgements, records, missing = label_split(judge, pairs, chunk)
            write_jsonl(out / f"{split}.jsonl", records)
            everything += judgements
            unlabelled += missing
            summary[f"{split}_pairs"] = len(records)
            summary[split] = str(out / f"{split}.jsonl")
        elapsed = time.perf_counter() - start
        write_jsonl(out / "unlabelled.jsonl", unlabelled)
        shared = agreement(db, judge.id, judge.template_version, reference_source)
    labelled = [j for j in everything if j.label is not None]
    c = judge.counts
    summary.update({
        f"ai_agreement_with_{reference_source}": shared["agreement"],
        f"ai_kappa_with_{reference_source}": shared["kappa"],
        "shared_pairs": shared["n"],
        "position_bias_rate": position_bias_rate([tuple(j.slot_probs) for j in everything])
        if judge_cfg.swap else None,
        "labels": len(labelled), "ties": sum(j.label == "tie" for j in everything),
        "unlabelled": len(unlabelled), "unparseable_answers": c["unparseable"],
        "failed_requests": c["failed"], "requests": c["requests"], "cache_hits": c["cache_hits"],
        # What a label costs, cached or not; cost_spent is what this run paid.
        "cost_per_label": sum(j.cost for j in labelled) / max(len(labelled), 1),
        "cost_spent": c["cost_spent"], "prompt_tokens": c["prompt_tokens"],
        "completion_tokens": c["completion_tokens"],
        "labels_per_second": len(labelled) / max(elapsed, 1e-9), "seconds": elapsed,
    })
    if getattr(judge.backend, "retries", None) is not None:
        summary["http_retries"] = judge.backend.retries
    return summary


def _enter(store: PreferenceStore, pairs: list[dict], reference: Path, source: str) -> None:
    """The pairs as sampled, and the other labels of them in ``reference`` where it exists."""
    # Pairs enter the store as sampled (a, b) before any label: stored in (chosen, rejected)
    # order, every reference label would read "a", and kappa would be 0 by construction.
    with store.transaction():
        for p in pairs:
            if p["response_a"] != p["response_b"]:
                store.add_pair_from_texts(p["prompt"], p["response_a"], p["response_b"])
    if reference.exists():
        store.import_preferences(reference, source=source, annotator=f"{source}:{reference}")
