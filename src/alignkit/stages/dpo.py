"""``alignkit dpo``: direct alignment from preferences (DPO, cDPO, IPO, hinge, KTO, SimPO, ORPO).

Setup: the policy (usually the SFT model, optionally with LoRA) and, for losses that need one,
the reference. Reference log-probs are computed **once** before training and cached with the
examples; the reference model is never called in a training step, and never loaded at all for
the reference-free losses (SimPO, ORPO). Loop: the shared training loop; chosen and rejected
go through one forward pass. Save: ``<out_dir>/model`` (with LoRA merged, and the adapter in
``<out_dir>/adapter``).

Online / iterative DPO (``online.rounds > 0``): each round samples two responses per prompt from
the current policy, labels the pairs (simulated annotators on a built-in task, the pairwise AI
judge, or a reward source), caches reference log-probs of the new pairs and trains on them; each
finished round is saved, so a stopped run resumes at the next round.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import require
from alignkit.data.sources import DataConfig, train_source
from alignkit.engine.dap_loss import (LossConfig, add_kto_mismatch, cache_reference, collate_dap,
                                      make_loss, unpair)
from alignkit.engine.models import LoraSpec
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.training import (LoopConfig, OptimConfig, final_model, make_accelerator, train,
                                      use_packing)
from alignkit.engine.workers import WorkersConfig
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class EvalConfig:
    task: str | None = None         # built-in task: sample test prompts and report gold reward
    chat: bool = False
    num_prompts: int = 100
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class OnlineConfig:
    rounds: int = 0                 # 0: offline DPO on data.train
    prompts_per_round: int = 256
    # "simulated" (Bradley-Terry draw on the gold of eval.task), "pairwise-judge:CONFIG" (the
    # RLAIF pairwise judge, both orders), or a reward source (model:, gold:, python:, judge:).
    labeler: str = "simulated"
    annotator_temperature: float = 0.2
    # A preference store (SQLite) that also records every round's labelled pairs, as source
    # "simulated" (simulated, gold:) or "ai", by annotator "online-dpo:<labeler>". (A judge
    # config's own `store` keeps the judge's soft labels apart, under the judge's id.)
    store: str | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        require(self.rounds >= 0, "online.rounds must be >= 0")
        require(self.prompts_per_round >= 1, "online.prompts_per_round must be >= 1")
        require(self.annotator_temperature >= 0, "online.annotator_temperature must be >= 0")


@dataclass(frozen=True)
class Config(TrackingConfig):
    model: str = ""
    reference: str | None = None    # default: the initial policy (``model``)
    out_dir: str = "runs/dpo"
    data: DataConfig = field(default_factory=lambda: DataConfig(train="online"))
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=10))
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)   # sampling, judge, RM: local | ray
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        require(bool(self.model), "model is required (a path of a causal LM)")
        require(self.online.rounds > 0 or self.data.train != "online",
                "data.train is required for offline DPO (or set online.rounds > 0)")
        require(self.online.rounds == 0 or self.loss.paired,
                f"online rounds produce pairs; use a paired loss, not {self.loss.name}")
        if self.online.rounds > 0:
            require(self.eval.task is not None or (self.data.train != "online"
                                                   and self.online.labeler != "simulated"),
                    "online DPO needs eval.task: its prompts (data.train=online) and the gold "
                    "of the simulated labeler come from the built-in task")
            # Each round resumes from its own checkpoints; one checkpoint path fits no round.
            require(self.train.resume in ("auto", "never"),
                    "online DPO resumes round by round: train.resume must be auto or never")
            # Each round samples with the trained policy in this process, in one piece.
            require(self.train.strategy == "ddp", f"online DPO (online.rounds > 0) trains with "
                    f"train.strategy=ddp; {self.train.strategy} is for offline DPO")


# ----------------------------------------------------------------------------------------------
# Setup and training, shared by offline DPO and every online round.


def make_eval(cfg: Config, tokenizer, reference):
    """Gold reward and KL to the reference on the built-in task's test prompts (``eval.task``)."""
    if cfg.eval.task is None:
        return None
    from alignkit.engine.evaluation import evaluate_on_task

    def eval_fn(model) -> dict:
        metrics, _ = evaluate_on_task(model, tokenizer, cfg.eval.task, cfg.eval.sampling,
                                      chat=cfg.eval.chat, num_prompts=cfg.eval.num_prompts,
                                      reference=reference, workers=cfg.workers)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    return eval_fn


def load_reference(cfg: Config, tokenizer, accelerator=None):
    """The reference model and the packing layout of its cached pass. With the run's
    ``accelerator`` (its ``train.strategy``), built and kept as the strategy keeps a frozen model:
    whole on every process under ddp / zero2, sharded under fsdp2 / zero3 (each process holds
    1/N of its weights; the cached pass runs on all of them in lockstep)."""
    from alignkit.engine.models import load_causal_lm

    reference = load_causal_lm(cfg.reference or cfg.model, tokenizer=tokenizer,
                               strategy=accelerator)
    pack = use_packing(reference, cfg.train, accelerator, pairs=True)   # before sharding
    if accelerator is None:
        return reference.eval(), pack
    return accelerator.prepare_frozen(reference), pack


def prepare_examples(source, tokenizer, cfg: Config, reference, pack: str | None = None,
                     chat: bool | None = None,
                     accelerator=None) -> tuple[list[dict], object]:
    """Tokenised training pairs (``chat``: string records as chat turns; default ``data.chat``),
    with the reference's log-probs cached when there is a reference (``pack``: the layout of
    that pass; ``accelerator``: each process computes its share, see ``cache_reference``). An
    unpaired loss (KTO) takes unpaired records, or preference pairs split as TRL splits them:
    the chosen completion a desirable example, the rejected one an undesirable one."""
    from alignkit.data.formats import build_dataset

    paired = cfg.loss.paired
    fmt = "preference" if paired else cfg.data.format
    examples, stats = build_dataset(source, tokenizer, format=fmt,
                                    accepts=None if paired else ("unpaired", "preference"),
                                    max_length=cfg.data.max_length, overlong=cfg.data.overlong,
                                    chat=cfg.data.chat if chat is None else chat)
    if not paired:
        if examples and "chosen_input_ids" in examples[0]:
            examples = unpair(examples)
        add_kto_mismatch(examples)
    if reference is not None:
        cache_reference(reference, examples, tokenizer.pad_token_id, pack=pack,
                        **({"rank": accelerator.process_index, "world": accelerator.num_processes}
                           if accelerator is not None else {}))
    return examples, stats


def fit(model, examples, cfg: Config, tokenizer, out: Path, tracker, accelerator, eval_fn):
    pad = tokenizer.pad_token_id
    pack = use_packing(model, cfg.train, accelerator, pairs=True)
    return train(model, examples,
                 lengths=[sum(len(e[k]) for k in e if k.endswith("input_ids")) for e in examples],
                 collate=lambda b: collate_dap(b, pad, pack), weight_of=lambda e: 1.0,
                 loss_fn=make_loss(cfg.loss), loop=cfg.train, optim=cfg.optim,
                 out_dir=out, tracker=tracker, accelerator=accelerator, eval_fn=eval_fn)


def main(cfg: Config) -> dict:
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    if cfg.online.rounds > 0:
        return run_online(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.strategy, cfg.train.offload)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage=f"dpo/{cfg.loss.name}")
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template, key="data.chat_template",
                               chat=cfg.data.chat or cfg.eval.chat)
    needs_ref = cfg.loss.needs_reference
    reference, pack = load_reference(cfg, tokenizer, accelerator) if needs_ref else (None, None)
    examples, stats = prepare_examples(train_source(cfg.data, cfg.train.seed), tokenizer, cfg,
                                       reference, pack, accelerator=accelerator)
    accelerator.print(f"alignkit dpo ({cfg.loss.name}): {stats}; reference log-probs "
                      f"{'cached' if needs_ref else 'not needed'}")
    eval_fn = make_eval(cfg, tokenizer, reference)
    if eval_fn is None and reference is not None:   # cached: training never calls it
        accelerator.release(reference)
        del reference
        gc.collect()      # a sharded one sits in reference cycles (its engine's hooks)
    model = apply_lora(load_causal_lm(cfg.model, tokenizer=tokenizer, strategy=accelerator),
                       cfg.lora)
    result = fit(model, examples, cfg, tokenizer, out, tracker, accelerator, eval_fn)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_model(trained, tokenizer, out / "model",
                   adapter_dir=out / "adapter")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"), "steps": result.step,
             "pairs": stats.kept, "model": str(out / "model"), "loss": cfg.loss.name,
             "beta": cfg.loss.beta, **result.distribution}
    final.update({k: v for k, v in result.last_metrics.items() if k.startswith(("rewards/", "kl"))})
    if not cfg.loss.paired:
        final["desirable"] = sum(bool(e["label"]) for e in examples)
        final["undesirable"] = len(examples) - final["desirable"]
    final.update(result.eval_metrics)
    return tracker.finish(final)


# ----------------------------------------------------------------------------------------------
# Online / iterative DPO. Each round ``r`` (Xu et al. 2023, "Some things are more CRINGE than
# others"; Guo et al. 2024, "Direct language model alignment from online AI feedback"):
#
# 1. sample two responses per prompt from the policy of round ``r - 1``;
# 2. label each pair: simulated annotators on a built-in task's gold reward (Bradley-Terry draw),
#    the pairwise AI judge (``pairwise-judge:CONFIG``, both orders averaged; Lee et al. 2023,
#    "RLAIF", Sec. 2.1), or any reward source (the higher-scored response is chosen, ties dropped);
#    the labelled pairs are written to ``round_<r>/pairs.jsonl`` and, with ``online.store``,
#    recorded in the preference store;
# 3. cache the reference log-probs of the new pairs (the reference stays the initial policy);
# 4. train with the configured DAP loss; save ``round_<r>/model`` and ``round_<r>/metrics.json``.
#
# A finished round (its ``metrics.json`` exists) is never redone: a restarted run loads the last
# finished round's model and goes on. A round interrupted after labelling reuses its
# ``pairs.jsonl`` (no second sampling, no second bill from a paid judge) and resumes training from
# its own checkpoint.


def round_prompts(prompts: list[str], r: int, n: int) -> list[str]:
    """The ``n`` prompts of round ``r``: consecutive slices, wrapping around a short list."""
    if not prompts:
        return []
    start = (r * n) % len(prompts)
    return [prompts[(start + i) % len(prompts)] for i in range(min(n, len(prompts)))]


def sample_and_label(policy, tokenizer, prompts: list[str], labeler, sampling, chat: bool,
                     seed: int, model_name: str,
                     workers: WorkersConfig | None = None) -> tuple[list[dict], int]:
    """Two samples per prompt, labelled; returns the preference records and the number of pairs
    sampled. A pair with an empty or duplicated response carries no preference and is skipped."""
    from alignkit.engine.sampling import informative_pairs, sample_pairs

    pairs = sample_pairs(policy, tokenizer, prompts, sampling, chat=chat, seed=seed,
                         workers=workers)
    kept = informative_pairs(pairs)
    records = labeler([p["prompt"] for p in kept], [p["response_a"] for p in kept],
                      [p["response_b"] for p in kept])
    # The store records which policy wrote each response.
    return [{**r, "model": model_name} for r in records], len(pairs)


def run_online(cfg: Config) -> dict:
    """Online / iterative DPO: ``online.rounds`` rounds of sample, label, train (above)."""
    from alignkit.data.io import read_jsonl, write_jsonl
    from alignkit.data.sources import load_prompts
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.feedback.labelers import label_with, record_in_store
    from alignkit.tracking import Tracker

    out = Path(cfg.out_dir)
    on = cfg.online
    tracker = Tracker(out, cfg, stage=f"online-{cfg.loss.name}")
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template, key="data.chat_template",
                               chat=cfg.data.chat or cfg.eval.chat)
    reference, ref_pack = load_reference(cfg, tokenizer)  # also the KL yardstick of the evals
    chat_suffix = ":chat" if cfg.eval.chat else ""
    prompt_spec = (cfg.data.train if cfg.data.train != "online"
                   else f"task:{cfg.eval.task}{chat_suffix}")
    prompts = load_prompts(prompt_spec, "train", on.rounds * on.prompts_per_round)
    labeler = label_with(on.labeler, cfg.eval.task, on.annotator_temperature, cfg.train.seed,
                         chat=cfg.eval.chat, workers=cfg.workers)
    eval_fn = make_eval(cfg, tokenizer, reference)
    policy_path, final = cfg.model, {}
    tracker.progress(on.rounds, unit="round")
    for r in range(on.rounds):
        round_dir = out / f"round_{r}"
        done = round_dir / "metrics.json"
        if done.exists():
            policy_path, final = str(round_dir / "model"), json.loads(done.read_text())
            print(f"[online] round {r}: done, skipping", flush=True)
            continue
        policy = load_causal_lm(policy_path, tokenizer=tokenizer).eval()
        pairs_path = round_dir / "pairs.jsonl"
        if pairs_path.exists():     # labelled before an interruption
            records = read_jsonl(pairs_path)
        else:
            records, n_sampled = sample_and_label(
                policy, tokenizer, round_prompts(prompts, r, on.prompts_per_round), labeler,
                on.sampling, cfg.eval.chat, cfg.train.seed + 1000 * r, policy_path, cfg.workers)
            if not records:
                raise ValueError(f"online round {r}: none of {n_sampled} sampled pairs was labelled "
                                 "(empty, identical or tied responses); sample longer responses "
                                 "or more prompts")
            round_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(pairs_path, records)
        if on.store:
            counts = record_in_store(on.store, pairs_path, on.labeler)
            print(f"[online] round {r}: store {on.store}: {counts}", flush=True)
        # In chat mode the responses train as assistant turns, tokenised as sampling rendered them.
        examples, stats = prepare_examples(
            records, tokenizer, cfg, reference if cfg.loss.needs_reference else None,
            ref_pack, chat=cfg.eval.chat)
        accelerator = make_accelerator(cfg.train.mixed_precision)
        model = apply_lora(policy.train(), cfg.lora)
        round_tracker = Tracker(round_dir, enabled=accelerator.is_main_process, stage=f"online r{r}")
        result = fit(model, examples, cfg, tokenizer, round_dir, round_tracker, accelerator, None)
        trained = accelerator.unwrap_model(model)
        metrics = {"round": r, "pairs": stats.kept, "train_loss": result.last_metrics.get("loss"),
                   **{k: v for k, v in result.last_metrics.items() if k.startswith("rewards/")}}
        if eval_fn is not None:
            trained.eval()
            metrics.update(eval_fn(trained))
        save_model(trained, tokenizer, round_dir / "model", adapter_dir=round_dir / "adapter")
        # Log before the round's metrics.json marks it done; a crash in between redoes the round
        # and the truncation keeps one row per round.
        tracker.truncate_after(r)
        tracker.log(r + 1, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        round_tracker.finish(metrics)
        policy_path, final = str(round_dir / "model"), metrics
    save_model(load_causal_lm(policy_path, tokenizer=tokenizer), tokenizer, out / "model")
    return tracker.finish({**final, "rounds": on.rounds, "model": str(out / "model"),
                           "loss": cfg.loss.name, "beta": cfg.loss.beta})
