"""``alignkit dpo``: direct alignment from preferences (DPO, cDPO, IPO, hinge, KTO, SimPO, ORPO).

Setup: the policy (usually the SFT model, optionally with LoRA) and, for losses that need one,
the reference. Reference log-probs are computed **once** before training and cached with the
examples; the reference model is never called in a training step, and never loaded at all for
the reference-free losses (SimPO, ORPO). Loop: the shared training loop; chosen and rejected
go through one forward pass. Save: ``<out_dir>/model``.

Online / iterative DPO (``online.rounds > 0``): each round samples two responses per prompt from
the current policy, labels the pairs (simulated annotators on a built-in task, the pairwise AI
judge, or a reward source), caches reference log-probs of the new pairs and trains on them; each
finished round is saved, so a stopped run resumes at the next round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from alignkit.config import require
from alignkit.data.sources import DataConfig
from alignkit.engine.generation import SamplingConfig
from alignkit.math.logprobs import IGNORE_INDEX, next_token_logps, sum_per_sequence
from alignkit.engine.forward import causal_logits, target_logps
from alignkit.math.losses import dpo_implicit_rewards, get_loss, kto_reference_point
from alignkit.engine.models import LoraSpec
from alignkit.engine.training import (LoopConfig, LossOutput, OptimConfig, make_accelerator,
                               use_packing, train)

REFERENCE_FREE = {"simpo", "orpo"}
PAIRED = {"dpo", "cdpo", "ipo", "hinge", "simpo", "orpo"}


@dataclass(frozen=True)
class LossConfig:
    name: str = "dpo"               # dpo | cdpo | ipo | hinge | kto | simpo | orpo
    beta: float = 0.1               # DPO/cDPO/hinge/KTO/SimPO beta; IPO tau
    label_smoothing: float = 0.1    # cDPO epsilon
    gamma: float = 0.5              # SimPO target margin (in units of beta-scaled reward)
    orpo_lambda: float = 0.1        # ORPO weight of the odds-ratio term
    desirable_weight: float = 1.0   # KTO lambda_D
    undesirable_weight: float = 1.0 # KTO lambda_U

    def __post_init__(self):
        require(self.name in PAIRED | {"kto"}, f"loss.name {self.name!r} is not one of "
                f"{sorted(PAIRED | {'kto'})}")
        require(self.beta > 0, "loss.beta must be > 0")
        require(0 <= self.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)")


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
class Config:
    model: str = ""
    reference: str | None = None    # default: the initial policy (``model``)
    out_dir: str = "runs/dpo"
    data: DataConfig = field(default_factory=lambda: DataConfig(train="online"))
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_steps=10))
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self):
        require(bool(self.model), "model is required (a path of a causal LM)")
        require(self.online.rounds > 0 or self.data.train != "online",
                "data.train is required for offline DPO (or set online.rounds > 0)")
        require(self.online.rounds == 0 or self.loss.name != "kto",
                "online rounds produce pairs; use a paired loss, not kto")
        if self.online.rounds > 0:
            require(self.eval.task is not None or (self.data.train != "online"
                                                   and self.online.labeler != "simulated"),
                    "online DPO needs eval.task: its prompts (data.train=online) and the gold "
                    "of the simulated labeler come from the built-in task")
            # Each round resumes from its own checkpoints; one checkpoint path fits no round.
            require(self.train.resume in ("auto", "never"),
                    "online DPO resumes round by round: train.resume must be auto or never")


# ----------------------------------------------------------------------------------------------
# Sequence log-probs: one forward pass over a padded or packed batch, summed over completion tokens.


def completion_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labelled tokens and their count: ``([N], [N])``, for a
    padded or a packed batch (one that lists its targets: ``collate_shared``)."""
    if "target_positions" in batch:
        return target_logps(model, batch)
    per_token, targets = next_token_logps(causal_logits(model, batch), batch["labels"])
    return (sum_per_sequence(per_token, batch),
            sum_per_sequence((targets != IGNORE_INDEX).float(), batch))


@torch.no_grad()
def cache_reference(reference, examples: list[dict], pad_id: int, batch_size: int = 32,
                    pack: str | None = None) -> None:
    """Store ``ref_chosen_logps``/``ref_rejected_logps`` (or ``ref_logps``, ``ref_kl_logps``
    for unpaired data) in each example, computed once with the reference in eval mode (fp32),
    on padded or (given a layout: ``collate_rows``) packed batches."""
    from alignkit.data.collate import collate_rows, to_device

    reference.eval()
    device = next(reference.parameters()).device
    fields = _sequence_fields(examples[0])
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        # All of a chunk's sequences in one batch, in collate_dap's order (the shared layout
        # pairs sequence i with i + len(chunk)).
        rows = [{"input_ids": e[f"{key}input_ids"], "labels": e[f"{key}labels"]}
                for key in fields for e in chunk]
        batch = to_device(collate_rows(rows, pad_id, pack), device)
        logps = completion_logps(reference, batch)[0].tolist()
        for j, key in enumerate(fields):
            for e, v in zip(chunk, logps[j * len(chunk):(j + 1) * len(chunk)]):
                e[f"ref_{key}logps"] = v


def _sequence_fields(example: dict) -> list[str]:
    """Key prefixes of the sequences an example holds: chosen_/rejected_, or ''/kl_."""
    if "chosen_input_ids" in example:
        return ["chosen_", "rejected_"]
    return ["", "kl_"]


def add_kto_mismatch(examples: list[dict]) -> None:
    """KTO's reference point uses mismatched (prompt, completion) pairs (Ethayarajh et al. 2024,
    §4.1): example ``i`` is paired with the completion of example ``i + 1``, fixed up front so the
    cached reference log-probs match what the policy sees."""
    n = len(examples)
    for i, e in enumerate(examples):
        other = examples[(i + 1) % n]
        prompt_len = next(j for j, t in enumerate(e["labels"]) if t != IGNORE_INDEX)
        other_start = next(j for j, t in enumerate(other["labels"]) if t != IGNORE_INDEX)
        completion = other["input_ids"][other_start:]
        e["kl_input_ids"] = e["input_ids"][:prompt_len] + completion
        e["kl_labels"] = [IGNORE_INDEX] * prompt_len + completion


# ----------------------------------------------------------------------------------------------
# Loss adapters: each maps (policy sequence stats, cached reference values) to the registered
# pure loss of :mod:`alignkit.math.losses`. One entry per variant, no branching.


def _ref(batch, key):
    return batch[key].float()


def _paired_ref_loss(name: str) -> Callable:
    def call(pol: dict, batch: dict, cfg: LossConfig) -> torch.Tensor:
        kwargs = {"label_smoothing": cfg.label_smoothing} if name == "cdpo" else {}
        return get_loss(name)(pol["chosen_logps"], pol["rejected_logps"],
                              _ref(batch, "ref_chosen_logps"), _ref(batch, "ref_rejected_logps"),
                              cfg.beta, **kwargs)
    return call


def _simpo(pol, batch, cfg):
    return get_loss("simpo")(pol["chosen_logps"], pol["rejected_logps"], pol["chosen_len"],
                             pol["rejected_len"], cfg.beta, cfg.gamma)


def _orpo(pol, batch, cfg):
    chosen_mean = pol["chosen_logps"] / pol["chosen_len"]
    rejected_mean = pol["rejected_logps"] / pol["rejected_len"]
    return get_loss("orpo")(chosen_mean, rejected_mean, -chosen_mean, cfg.orpo_lambda)


def _kto(pol, batch, cfg):
    z0 = kto_reference_point(pol["kl_logps"], _ref(batch, "ref_kl_logps"))
    return get_loss("kto")(pol["logps"], _ref(batch, "ref_logps"), batch["label"].bool(), z0,
                           cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)


ADAPTERS: dict[str, Callable] = {
    **{n: _paired_ref_loss(n) for n in ("dpo", "cdpo", "ipo", "hinge")},
    "simpo": _simpo, "orpo": _orpo, "kto": _kto,
}


def collate_dap(examples: list[dict], pad_id: int, pack: str | None = None) -> dict:
    """All sequences of the batch in one right-padded block (chosen rows, then rejected rows;
    or completions then KTO mismatched pairs), or packed in that order given a layout
    (``pack``: ``collate_packed``), plus the cached reference values."""
    from alignkit.data.collate import collate_rows

    fields = _sequence_fields(examples[0])
    rows = [{"input_ids": e[f"{k}input_ids"], "labels": e[f"{k}labels"]}
            for k in fields for e in examples]
    batch = collate_rows(rows, pad_id, pack)
    for key in ("ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps"):
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float64)
    if "label" in examples[0]:
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


def make_loss(cfg: LossConfig):
    adapter = ADAPTERS[cfg.name]
    paired = cfg.name in PAIRED

    def loss_fn(model, batch) -> LossOutput:
        logps, lengths = completion_logps(model, batch)
        b = logps.shape[0] // 2
        names = ("chosen_", "rejected_") if paired else ("", "kl_")
        pol = {f"{names[0]}logps": logps[:b], f"{names[1]}logps": logps[b:],
               f"{names[0]}len": lengths[:b], f"{names[1]}len": lengths[b:]}
        if not paired:
            pol["kl_logps"] = pol["kl_logps"].detach()  # the reference point is not trained
        values = adapter(pol, batch, cfg)
        metrics = {}
        if paired:
            if cfg.name in REFERENCE_FREE:
                chosen_r = cfg.beta * pol["chosen_logps"] / pol["chosen_len"]
                rejected_r = cfg.beta * pol["rejected_logps"] / pol["rejected_len"]
            else:
                chosen_r, rejected_r = dpo_implicit_rewards(
                    pol["chosen_logps"], pol["rejected_logps"], _ref(batch, "ref_chosen_logps"),
                    _ref(batch, "ref_rejected_logps"), cfg.beta)
            metrics = {"rewards/chosen": (chosen_r.detach().sum(), b),
                       "rewards/rejected": (rejected_r.detach().sum(), b),
                       "rewards/margin": ((chosen_r - rejected_r).detach().sum(), b),
                       "rewards/accuracy": ((chosen_r > rejected_r).float().sum(), b)}
        return LossOutput(values=values, weights=torch.ones_like(values), metrics=metrics)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Evaluation on built-in tasks: sample the policy, score with the gold reward, KL to reference.


def make_eval(cfg: Config, tokenizer, reference):
    if cfg.eval.task is None:
        return None
    from alignkit.stages.evaluate import Config as EvalStageConfig, evaluate_policy

    ecfg = EvalStageConfig(policy=cfg.model, task=cfg.eval.task, chat=cfg.eval.chat,
                           num_prompts=cfg.eval.num_prompts, sampling=cfg.eval.sampling)

    def eval_fn(model) -> dict:
        metrics, _ = evaluate_policy(model, tokenizer, ecfg, reference=reference)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    return eval_fn


def load_reference(cfg: Config, tokenizer):
    from alignkit.engine.models import load_causal_lm

    return load_causal_lm(cfg.reference or cfg.model, tokenizer=tokenizer).eval()


def prepare_examples(source, tokenizer, cfg: Config, reference,
                     chat: bool | None = None) -> tuple[list[dict], object]:
    """Tokenised training pairs (``chat``: string records as chat turns; default ``data.chat``),
    with the reference's log-probs cached when there is a reference."""
    from alignkit.data.formats import build_dataset

    fmt = "unpaired" if cfg.loss.name == "kto" else "preference"
    examples, stats = build_dataset(source, tokenizer, format=fmt, max_length=cfg.data.max_length,
                                    overlong=cfg.data.overlong,
                                    chat=cfg.data.chat if chat is None else chat)
    if cfg.loss.name == "kto":
        add_kto_mismatch(examples)
    if reference is not None:
        cache_reference(reference, examples, tokenizer.pad_token_id,
                        pack=use_packing(reference, cfg.train, pairs=True))
    return examples, stats


def fit(model, examples, cfg: Config, tokenizer, out: Path, tracker, accelerator, eval_fn,
        loop: LoopConfig | None = None):
    pad = tokenizer.pad_token_id
    pack = use_packing(model, loop or cfg.train, accelerator, pairs=True)
    return train(model, examples,
                 lengths=[sum(len(e[k]) for k in e if k.endswith("input_ids")) for e in examples],
                 collate=lambda b: collate_dap(b, pad, pack), weight_of=lambda e: 1.0,
                 loss_fn=make_loss(cfg.loss), loop=loop or cfg.train, optim=cfg.optim,
                 out_dir=out, tracker=tracker, accelerator=accelerator, eval_fn=eval_fn)


def main(cfg: Config) -> dict:
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    if cfg.online.rounds > 0:
        from alignkit.stages.online_dpo import run_online

        return run_online(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage=f"dpo/{cfg.loss.name}")
    tokenizer = load_tokenizer(cfg.model)
    needs_ref = cfg.loss.name not in REFERENCE_FREE
    reference = load_reference(cfg, tokenizer) if needs_ref else None
    examples, stats = prepare_examples(Path(cfg.data.train), tokenizer, cfg, reference)
    accelerator.print(f"alignkit dpo ({cfg.loss.name}): {stats}; reference log-probs "
                      f"{'cached' if needs_ref else 'not needed'}")
    model = apply_lora(load_causal_lm(cfg.model, tokenizer=tokenizer), cfg.lora)
    result = fit(model, examples, cfg, tokenizer, out, tracker, accelerator,
                 make_eval(cfg, tokenizer, reference))
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out / "model")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"), "steps": result.step,
             "pairs": stats.kept, "model": str(out / "model"), "loss": cfg.loss.name,
             "beta": cfg.loss.beta}
    final.update({k: v for k, v in result.last_metrics.items() if k.startswith("rewards/")})
    final.update(result.eval_metrics)
    return tracker.finish(final)
