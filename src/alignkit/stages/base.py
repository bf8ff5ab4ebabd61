"""``alignkit base``: train a small GPT-style model and a BPE tokenizer from scratch on a task.

The built-in tasks need a base model that nobody has to download. This stage writes one: a
byte-level BPE tokenizer trained on the task's corpus and a Llama-architecture causal LM trained
on the same text, both saved with ``save_pretrained`` so every later stage loads them through
``from_pretrained(path)`` exactly as it would load a hub model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import require
from alignkit.engine.training import (LoopConfig, OptimConfig, final_model, make_accelerator, train,
                                      use_packing)
from alignkit.tracking import TrackingConfig


@dataclass(frozen=True)
class ArchConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256


@dataclass(frozen=True)
class Config(TrackingConfig):
    task: str = "sentiment"
    chat: bool = False
    out_dir: str = "runs/base"
    num_documents: int = 20000
    vocab_size: int = 1024
    max_length: int = 128
    seed: int = 0
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=30,
                                                                    weight_decay=0.01))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=1.0, batch_size=64,
                                                                 micro_batch_size=64))

    def __post_init__(self):
        require(self.num_documents > 0, "num_documents must be > 0")
        require(self.vocab_size >= 300, "vocab_size must be >= 300 (256 bytes + specials + merges)")


def build_model(cfg: Config, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    a = cfg.arch
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_heads, max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def document_ids(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """BOS + text + EOS per document, cut at ``max_length`` (the tokenizer adds BOS itself)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(texts)["input_ids"]:
        if not ids or ids[0] != tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id] + ids
        out.append((ids + [eos])[:max_length])
    return out


def lm_collate(seqs: list[list[int]], pad_id: int, pack: str | None = None) -> dict:
    """Documents as language-modelling rows (every token a target), padded or packed."""
    from alignkit.data.collate import collate_rows

    return collate_rows([{"input_ids": s, "labels": s} for s in seqs], pad_id, pack)


def main(cfg: Config) -> dict:
    from alignkit.engine.models import save_model
    from alignkit.engine.lm_loss import causal_lm_loss
    from alignkit.tasks import get_task
    from alignkit.engine.tokenizer import train_tokenizer
    from alignkit.tracking import Tracker

    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.strategy, cfg.train.offload)
    out = Path(cfg.out_dir)
    tracker = Tracker(out, cfg, enabled=accelerator.is_main_process, stage="base")
    task = get_task(cfg.task, chat=cfg.chat)
    texts = task.corpus(cfg.num_documents, seed=cfg.seed)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    seqs = document_ids(texts, tokenizer, cfg.max_length)
    model = build_model(cfg, tokenizer)
    accelerator.print(f"alignkit base: {len(seqs)} documents, vocab {len(tokenizer)}, "
                      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    pad, pack = tokenizer.pad_token_id, use_packing(model, cfg.train, accelerator)
    result = train(model, seqs, lengths=[len(s) for s in seqs],
                   collate=lambda b: lm_collate(b, pad, pack),
                   weight_of=lambda s: len(s) - 1, loss_fn=causal_lm_loss, loop=cfg.train,
                   optim=cfg.optim, out_dir=out, tracker=tracker, accelerator=accelerator)
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_model(trained, tokenizer, out / "model")
    return tracker.finish({"loss": result.last_metrics.get("loss"), "steps": result.step,
                           "model": str(out / "model"), **result.distribution})
