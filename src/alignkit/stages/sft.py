"""``alignkit sft``: supervised fine-tuning on demonstrations (prompt/completion or chat).

Setup: tokenizer + causal LM via ``from_pretrained``, optional LoRA, data with loss on completion
tokens only. Loop: :func:`alignkit.engine.training.train` with the token-level NLL. Save: a Hugging
Face folder ``<out_dir>/model`` (LoRA merged) that every later stage loads by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from alignkit.config import require
from alignkit.data.sources import DataConfig, sft_source
from alignkit.math.logprobs import IGNORE_INDEX
from alignkit.engine.forward import labelled_logps
from alignkit.math.losses import sft_loss
from alignkit.engine.models import LoraSpec
from alignkit.engine.training import (LoopConfig, LossOutput, OptimConfig, make_accelerator,
                               use_packing, train)


@dataclass(frozen=True)
class Config:
    model: str = ""
    out_dir: str = "runs/sft"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        require(bool(self.model), "model is required (a path or hub name of a causal LM)")


def causal_lm_loss(model, batch, token_weights: torch.Tensor | None = None,
                   last_rows_only: bool = False) -> LossOutput:
    """Per-token NLL of the labelled (completion) tokens; prompt and padding weigh 0.

    The values cover the positions that have a target (``labelled_logps``), not every position;
    ``token_weights`` ``[R, T-1]`` (aligned with ``labels[:, 1:]``) scale each token's weight;
    ``last_rows_only``: see ``labelled_logps`` and :func:`loss_for`."""
    logps, targets, positions = labelled_logps(model, batch, last_rows_only)
    weights = (targets != IGNORE_INDEX).float()
    if token_weights is not None:
        weights = weights * token_weights[:, positions]
    return LossOutput(values=sft_loss(logps), weights=weights)


def supports_last_rows_only(model, pack: str | None) -> bool:
    """Whether ``labelled_logps`` gives the same log-probs with ``last_rows_only`` on ``model``
    (``forward.rows_only_agrees``), checked on two random sequences with targets on their second
    half, in layout ``pack`` (right-padded for None)."""
    from alignkit.data.collate import collate_rows, to_device
    from alignkit.engine.forward import probe_sequences, rows_only_agrees

    rows = [{"input_ids": s, "labels": [IGNORE_INDEX] * (len(s) // 2) + s[len(s) // 2:]}
            for s in probe_sequences(model, (7, 10))]
    batch = to_device(collate_rows(rows, 0, pack), next(model.parameters()).device)
    return rows_only_agrees(model, lambda only: labelled_logps(model, batch, only)[0])


def loss_for(model, pack: str | None):
    """:func:`causal_lm_loss` for ``model``, with its last MLP at the targets only where that
    is checked to give the same values (``supports_last_rows_only``)."""
    return partial(causal_lm_loss, last_rows_only=supports_last_rows_only(model, pack))


def n_targets(example: dict) -> int:
    return sum(1 for t in example["labels"][1:] if t != IGNORE_INDEX)


@torch.no_grad()
def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int = 32) -> dict:
    from alignkit.data.collate import collate_sft, to_device

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate_sft(examples[s:s + batch_size], pad_id), device)
        out = causal_lm_loss(model, batch)
        total += float((out.values * out.weights).sum())
        count += int(out.weights.sum())
    nll = total / max(count, 1)
    return {"loss": nll, "perplexity": float(torch.exp(torch.tensor(nll)))}


def main(cfg: Config) -> dict:
    from alignkit.data.collate import collate_rows
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import apply_lora, load_causal_lm, load_tokenizer, save_model
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="sft")
    tokenizer = load_tokenizer(cfg.model)
    d = cfg.data
    train_src = sft_source(d.train, "train", d.task_samples, seed=cfg.train.seed)
    examples, stats = build_dataset(train_src, tokenizer, format=d.format,
                                    max_length=d.max_length, overlong=d.overlong, chat=d.chat)
    eval_examples = []
    if d.eval:
        eval_src = sft_source(d.eval, "test", d.eval_samples, seed=cfg.train.seed)
        eval_examples, _ = build_dataset(eval_src, tokenizer, format=d.format,
                                         max_length=d.max_length, overlong=d.overlong, chat=d.chat)
    model = apply_lora(load_causal_lm(cfg.model, tokenizer=tokenizer), cfg.lora)
    pad, pack = tokenizer.pad_token_id, use_packing(model, cfg.train, accelerator)
    accelerator.print(f"alignkit sft: {stats}")
    result = train(model, examples, lengths=[len(e["input_ids"]) for e in examples],
                   collate=lambda b: collate_rows(b, pad, pack), weight_of=n_targets,
                   loss_fn=loss_for(model, pack), loop=cfg.train, optim=cfg.optim, out_dir=out,
                   tracker=tracker, accelerator=accelerator,
                   eval_fn=(lambda m: eval_loss(m, eval_examples, pad)) if eval_examples else None)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out / "model")
    accelerator.wait_for_everyone()
    final = {"train_loss": result.last_metrics.get("loss"), "steps": result.step,
             "examples": stats.kept, "truncated": stats.truncated, "dropped": stats.dropped,
             "model": str(out / "model")}
    final.update({f"eval_{k}": v for k, v in result.eval_metrics.items()})
    return tracker.finish(final)
