"""``alignkit judge-model``: teach a small causal LM to answer the judge's prompts, offline.

RLAIF needs an off-the-shelf LLM that can judge; offline there is none, so this stage makes one
from a task's own text. The built-in ``sentiment`` task writes each review from a latent overall
sentiment (:func:`alignkit.tasks.sentiment.reviews` returns ``Review(text, sentiment)``); the
judge's training prompts are rendered with the judge config's own templates from review texts,
and their answers come from those latents: pairwise "1"/"2" (which review the writer meant to be
more positive) and pointwise 1-10 (the latent mapped to the scale). The hidden gold reward is never
read: the gold also scores fluency and repetition, which this judge never sees a label for, so
its agreement with gold-based labels is a real measurement, not the gold in disguise.

Setup: base model + the rendered records. Loop: supervised fine-tuning on the answer tokens
(:func:`alignkit.stages.sft.causal_lm_loss`). Save: ``<out_dir>/model``; then the held-out check
runs through :class:`alignkit.engine.judges.PairwiseJudge` / ``PointwiseJudge``, the same code
that labels with any other LLM.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignkit.config import require
from alignkit.engine.judges import JudgeConfig, render, render_messages
from alignkit.engine.training import (LoopConfig, OptimConfig, final_model, make_accelerator, train,
                                      use_packing)
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class Config(TrackingConfig):
    model: str = ""                   # base causal LM to fine-tune
    task: str = "sentiment"
    out_dir: str = "runs/judge_model"
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(model="(this stage's output)"))
    pairwise_examples: int = 6000
    pointwise_examples: int = 2000
    eval_examples: int = 200          # held-out pairs / responses judged after (and during) training
    max_response_words: int = 40      # cut continuations to 4..this many words, as sampled ones are
    min_latent_gap: float = 0.3       # training pairs whose writers' intents clearly differ
    # With judge.pairwise.chain_of_thought: the rationale the judge learns to write before its
    # verdict (Lee et al. 2023 Sec. 2.1.2), here each review's 1-10 score from its latent.
    rationale: str = "Review 1: {score_a}. Review 2: {score_b}."
    corpus_seed: int = 1
    max_length: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=32, micro_batch_size=32,
                                                                 log_every=25))

    def __post_init__(self):
        require(bool(self.model), "model is required (the base causal LM to fine-tune)")
        require(self.task in LATENT_CORPORA, f"judge-model knows the latent labels of "
                f"{sorted(LATENT_CORPORA)}, not {self.task!r}")
        require(not self.judge.pointwise.chain_of_thought, "judge-model trains direct pointwise "
                "answers; switch judge.pointwise.chain_of_thought off")
        require(not self.judge.pairwise.chain_of_thought or self.judge.format == "chat",
                "a chain-of-thought judge is trained on chat conversations (judge.format=chat)")
        require(self.pairwise_examples + self.pointwise_examples > 0, "no training examples asked for")


def _sentiment_corpus(n: int, seed: int) -> list[tuple[str, float]]:
    from alignkit.tasks.sentiment import reviews

    return [(r.text, r.sentiment) for r in reviews(n, seed)]


# task -> (n, seed) -> [(text, latent in [-1, 1])]: the writer's intent, not the gold reward.
LATENT_CORPORA = {"sentiment": _sentiment_corpus}


def _split(text: str, rng: random.Random, max_words: int) -> tuple[str, str]:
    """A prompt of the first 3-6 words and a continuation of 4..max_words words after it."""
    words = text.split(" ")
    k = min(rng.randint(3, 6), len(words) - 1)
    rest = words[k:k + rng.randint(4, max(4, max_words))]
    return " ".join(words[:k]), " " + " ".join(rest)


def score_of(latent: float) -> int:
    """Latent sentiment in [-1, 1] -> the 1-10 scale."""
    return max(1, min(10, round(1 + 9 * (latent + 1) / 2)))


def judging_examples(cfg: Config, n_pairs: int, n_points: int, seed: int,
                     min_gap: float = 0.0) -> tuple[list, list]:
    """``(pairwise, pointwise)`` examples ``(fields, answer, rationale)`` for the templates;
    pairs whose latents differ by less than ``min_gap`` are skipped (their label is mostly noise)."""
    rng = random.Random(seed)
    corpus = LATENT_CORPORA[cfg.task](6 * n_pairs + n_points, cfg.corpus_seed + seed)
    pairs = []
    for (text_a, lat_a), (text_b, lat_b) in zip(corpus[:6 * n_pairs:2], corpus[1:6 * n_pairs:2]):
        if abs(lat_a - lat_b) < min_gap or len(pairs) == n_pairs:
            continue
        prompt, resp_a = _split(text_a, rng, cfg.max_response_words)
        _, resp_b = _split(text_b, rng, cfg.max_response_words)   # both continue the same prompt
        pairs.append(({"prompt": prompt, "response_a": resp_a, "response_b": resp_b},
                      "1" if lat_a > lat_b else "2",
                      cfg.rationale.format(score_a=score_of(lat_a), score_b=score_of(lat_b))))
    points = []
    for text, latent in corpus[6 * n_pairs:]:
        prompt, response = _split(text, rng, cfg.max_response_words)
        points.append(({"prompt": prompt, "response": response}, str(score_of(latent)), None))
    return pairs, points


def sft_records(cfg: Config, pairs: list, points: list) -> list[dict]:
    """Prompts rendered exactly as the judge renders them; the answer is the completion."""
    j = cfg.judge
    records = []
    for template, items in ((j.pairwise, pairs), (j.pointwise, points)):
        for fields, answer, rationale in items:
            if template.chain_of_thought:   # both assistant turns are targets
                messages = render_messages(template, fields, rationale)
                records.append({"messages": messages + [{"role": "assistant", "content": answer}]})
                continue
            prompt = render(template, fields, j.format)
            completion = [{"role": "assistant", "content": answer}] if j.format == "chat" \
                else " " + answer
            records.append({"prompt": prompt, "completion": completion})
    return records


def heldout_check(cfg: Config, model_path: str, pairs: list, points: list, backend=None) -> dict:
    """Agreement with the latent labels through the ordinary judge code (local backend)."""
    from alignkit.engine.judges import PairwiseJudge, PointwiseJudge

    judge_cfg = replace(cfg.judge, model=model_path, backend="local",
                        id="judge-model-check" if backend is not None else "")
    out: dict = {}
    if pairs:
        judge = PairwiseJudge(judge_cfg, backend=backend)
        fields = [f for f, _, _ in pairs]
        res = judge.judge([f["prompt"] for f in fields], [f["response_a"] for f in fields],
                          [f["response_b"] for f in fields])
        right = [(r.label == "a") == (answer == "1") for r, (_, answer, _) in zip(res, pairs)
                 if r.label in ("a", "b")]
        from alignkit.engine.judges import position_bias_rate

        out["heldout_pair_accuracy"] = sum(right) / max(len(right), 1)
        out["heldout_position_bias_rate"] = position_bias_rate([tuple(r.slot_probs) for r in res])
    if points:
        import numpy as np

        scores = PointwiseJudge(judge_cfg, backend=backend).scores(
            [f["prompt"] for f, _, _ in points], [f["response"] for f, _, _ in points])
        ok = [(s, int(a)) for s, (_, a, _) in zip(scores, points) if s is not None]
        out["heldout_score_corr"] = float(np.corrcoef([s for s, _ in ok], [a for _, a in ok])[0, 1])
    return out


def main(cfg: Config) -> dict:
    from alignkit.data.collate import collate_rows
    from alignkit.data.formats import build_dataset
    from alignkit.data.io import write_jsonl
    from alignkit.engine.lm_loss import loss_for, n_targets
    from alignkit.engine.models import load_causal_lm, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.strategy, cfg.train.offload)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="judge-model")
    tokenizer = load_tokenizer(cfg.model)
    pairs, points = judging_examples(cfg, cfg.pairwise_examples, cfg.pointwise_examples, seed=0,
                                     min_gap=cfg.min_latent_gap)
    records = sft_records(cfg, pairs, points)
    if accelerator.is_main_process:
        write_jsonl(out / "judge_data.jsonl", records)
    # A judging prompt cut short would hide a response from the judge: drop, never truncate.
    examples, kept, dropped = [], 0, 0
    for fmt in ("prompt_completion", "messages"):   # direct answers; chain-of-thought talks
        part = [r for r in records if ("messages" in r) == (fmt == "messages")]
        if part:
            built, stats = build_dataset(part, tokenizer, format=fmt, max_length=cfg.max_length,
                                         overlong="drop")
            examples, kept, dropped = examples + built, kept + stats.kept, dropped + stats.dropped
    accelerator.print(f"alignkit judge-model: {len(pairs)} pairwise + {len(points)} pointwise "
                      f"examples, {dropped} too long")
    model = load_causal_lm(cfg.model, tokenizer=tokenizer, strategy=accelerator)
    pad, pack = tokenizer.pad_token_id, use_packing(model, cfg.train, accelerator)
    # Held-out pairs (another stream of the corpus) are judged during training, through the judge.
    held_pairs, held_points = judging_examples(
        cfg, cfg.eval_examples if cfg.pairwise_examples else 0,
        cfg.eval_examples if cfg.pointwise_examples else 0, seed=1)

    def eval_fn(m) -> dict:
        from alignkit.engine.judges import LocalBackend

        backend = LocalBackend(cfg.model, cfg.judge.batch_size, model=m, tokenizer=tokenizer,
                               engine=cfg.judge.engine)
        return heldout_check(cfg, str(out / "model"), held_pairs, held_points, backend)

    result = train(model, examples, lengths=[len(e["input_ids"]) for e in examples],
                   collate=lambda b: collate_rows(b, pad, pack), weight_of=n_targets,
                   loss_fn=loss_for(model, pack), loop=cfg.train, optim=cfg.optim, out_dir=out,
                   tracker=tracker, accelerator=accelerator,
                   eval_fn=eval_fn if cfg.eval_examples else None)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_model(trained, tokenizer, out / "model")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"), "steps": result.step,
             "examples": kept, "dropped": dropped, "model": str(out / "model"),
             **result.eval_metrics, **result.distribution}
    return tracker.finish(final)


def load(path: str, overrides: list[str]) -> Config:
    """``--config`` may be a file with a shared ``judge:`` section and a ``judge_model:`` one."""
    from alignkit.engine.judges import load_stage_config

    return load_stage_config(Config, path, "judge_model", overrides)
