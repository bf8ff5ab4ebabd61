"""The training loop every offline stage shares, on ``accelerate``.

A stage supplies the items, a ``collate`` for a list of items, a ``weight_of`` per item (how many
loss terms it contributes: completion tokens for SFT, 1 per pair for a reward model) and a
``loss_fn(model, batch) -> LossOutput`` with *unreduced* values. The loop owns batching, the one
reduction (:func:`alignkit.math.losses.reduce_loss`), accumulation, clipping, the schedule,
checkpoints and resume. Because every rank knows the whole global batch, the normaliser of the
reduction is exact without a collective, so 1 process == N accumulation steps == N ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from alignkit.config import ConfigError, require
from alignkit.data.collate import to_device
from alignkit.math.losses import reduce_loss


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        require(len(self.betas) == 2, "optim.betas must have two values")
        require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio must be in [0, 1]")


@dataclass(frozen=True)
class LoopConfig:
    epochs: float = 1.0
    max_steps: int = 0          # 0: derived from epochs
    batch_size: int = 16        # items per optimiser step, over all processes and accumulation
    micro_batch_size: int = 8   # items per forward pass on one process
    # Random batches by default. Length-grouped ones (each batch from one length band) trained
    # worse here: arithmetic's base reached half the held-out accuracy after 1,000 steps, the
    # sentiment base a loss of 1.239 vs 1.160. Packed (below), they save no compute either.
    group_by_length: bool = False
    # Pack each micro-batch without padding (position ids restart per sequence; one flat row
    # where attention runs per sequence, see use_packing) when the model is checked to support
    # it (alignkit.engine.forward.supports_packing); else pad.
    packing: bool = True
    eval_every: int = 0         # 0: only at the end
    save_every: int = 0         # 0: only at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"   # auto: resolve_precision
    resume: str = "auto"        # "auto": latest checkpoint in the output folder; "never"; or a path
    # How processes share the model (alignkit.engine.strategies): ddp (replicated), fsdp2
    # (PyTorch FSDP2), zero2 / zero3 (DeepSpeed ZeRO); offload: parameters and optimiser state in
    # CPU memory while a GPU computes (fsdp2, zero3).
    strategy: str = "ddp"
    offload: bool = False

    def __post_init__(self):
        from alignkit.engine.strategies import validate

        require(self.batch_size > 0 and self.micro_batch_size > 0, "train.batch_size and "
                "train.micro_batch_size must be > 0")
        validate(self.strategy, self.offload, prefix="train.")
        require(self.epochs > 0 or self.max_steps > 0, "train.epochs or train.max_steps must be > 0")


@dataclass
class LossOutput:
    values: torch.Tensor                  # unreduced loss terms, [B] or [B, T]
    weights: torch.Tensor                 # same shape: 1 where a term counts (mask), else 0
    # name -> (sum, count): logged as the step's sum over its count (a mean); a count of None
    # logs the step's sum itself (a total, e.g. how many examples of a kind the step saw).
    metrics: dict[str, tuple[torch.Tensor, float | None]] = field(default_factory=dict)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles).

    Without them PyTorch emulates bf16 products: on an AVX2-only CPU a bf16 matmul measured
    ~100x slower than fp32 (0.75 vs 69 GFLOP/s, ``bench/peak.py``), so "auto" must not pick it.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private; older torch lacks some
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(mixed_precision: str) -> str:
    """``"auto"``: bf16 where the hardware runs it fast (a CUDA GPU that supports it, or a CPU with
    bf16 matrix instructions), else fp32 (``"no"``); other values pass through."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def make_accelerator(mixed_precision: str, strategy: str = "ddp", offload: bool = False):
    """The run's accelerator: an ``accelerate.Accelerator`` (device, precision, process group)
    inside the :mod:`~alignkit.engine.strategies` strategy ``strategy`` (``train.strategy``),
    which checks that it can be had here and what the launch gave."""
    from accelerate import Accelerator

    from alignkit.engine.strategies import STRATEGIES

    cuda = torch.cuda.is_available()
    mixed_precision = resolve_precision(mixed_precision)
    # Stages run one after another in one process (the pipeline, tests) with their own
    # precision; accelerate keeps a process-wide singleton that refuses a second setting. The
    # process group (PartialState) is kept, so this is safe in multi-process runs too.
    from accelerate.state import AcceleratorState, GradientState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    # Our loop steps the scheduler once per optimiser step; accelerate's default would step it
    # once per process (it assumes each rank's dataloader shrank), which would change the LR.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not cuda,
                              step_scheduler_with_optimizer=False)
    return STRATEGIES[strategy](accelerator, offload=offload)


def use_packing(model, loop: LoopConfig, accelerator=None, pairs: bool = False) -> str | None:
    """The packed layout to train ``model`` on (``collate_packed``), or None to pad.

    ``"flat"`` (one row, no filler) where attention runs per sequence: flash attention, or
    transformers' SDPA, which this switches to ``alignkit_sdpa`` (:mod:`alignkit.engine.attention`);
    ``"rows"`` (rows as wide as the longest sequence) where attention honours packed position
    ids over dense masks (e.g. eager); None if ``loop.packing`` is off or the model attends
    across packed sequences. ``pairs``: the batches are pairs that share a prompt (chosen and
    rejected, ``collate_preference``): ``"shared"`` first (``collate_shared``: each prompt once),
    where the attention lets a pair share it (``alignkit_sdpa``; checked like the others).
    """
    from alignkit.engine.attention import flat_packing
    from alignkit.engine.forward import supports_packing

    if not loop.packing:
        return None

    layouts = ("rows",)
    if flat_packing(model):   # on every process: it switches the model's attention
        layouts = (("shared",) if pairs else ()) + ("flat", "rows")

    def probe(model):
        if accelerator is not None:
            # Probe where training runs: e.g. flash attention packs natively on GPU, not on CPU.
            model.to(accelerator.device)
        flat_packing(model)   # the same switch on a whole copy the strategy probes instead
        # e.g. a custom model whose forward takes no extra kwargs fails flat and may pass rows.
        return next((lay for lay in layouts if supports_packing(model, lay)), None)

    # A model the strategy built sharded has whole weights in the main process only: it probes.
    layout = accelerator.on_whole(model, probe) if hasattr(accelerator, "on_whole") \
        else probe(model)
    if layout is None:
        (accelerator.print if accelerator else print)(
            "alignkit: this model does not confine attention to packed sequences; training on "
            "padded batches (train.packing=false silences this)")
    return layout


def lr_lambda(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""

    def fn(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        span = max(total_steps - optim.warmup_steps, 1)
        progress = min((step - optim.warmup_steps) / span, 1.0)
        if optim.schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    return fn


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    # An empty group (e.g. LoRA: only matrices train) is left out: DeepSpeed drops it, and the
    # schedule must see the groups the optimiser steps.
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # The fused kernel (one pass over all parameters; CPU and CUDA) is the same AdamW update,
    # ~2.6x faster than the per-tensor loop in a microbenchmark of 10M parameters on 2 CPU cores.
    # Every process must pick the same kernel (their updates differ in the last bit otherwise):
    # a sharded build's meta parameters (Strategy.build) get the main process's device later.
    fused = all(p.device.type in ("cpu", "cuda", "meta") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=fused or None)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Global batches of one epoch (incomplete tail dropped), deterministic in (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        # Sort within mega-chunks of 32 batches, so each batch holds similar lengths (little
        # padding) while batches still come in random order.
        mega = batch_size * 32
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def total_steps_for(n_items: int, loop: LoopConfig) -> tuple[int, int]:
    per_epoch = n_items // loop.batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_items} training items are fewer than one batch "
                         f"(train.batch_size={loop.batch_size})")
    total = loop.max_steps if loop.max_steps > 0 else math.ceil(loop.epochs * per_epoch)
    return per_epoch, total


@dataclass
class TrainResult:
    step: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    # What the run got (train.strategy, the distributed type, processes): stages record it.
    distribution: dict = field(default_factory=dict)


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    return ckpts[-1] if ckpts else None


def remove_folder(path: Path) -> None:
    """Delete ``path`` so that a kill midway leaves no part of it under its name (a checkpoint
    that lost some files would be loaded, and fail, on resume): rename it first, atomically, then
    delete the renamed folder (and one that an earlier kill left)."""
    doomed = path.with_name(f".deleting_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    if path.exists():
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(accelerator, out_dir: Path, step: int, keep: int,
                    state: dict | None = None) -> None:
    """Write to a temporary folder, then rename: a crash never leaves a half checkpoint.
    ``state``: what the run reports beside its weights (the last metrics), kept with them in
    ``trainer_state.json`` so that a run resumed at its end reports what it would have."""
    root = out_dir / "checkpoints"
    tmp = root / f".tmp_step_{step}"
    final = root / f"step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {**(state or {}), "step": step, **_layout(accelerator)}))
        # A run resumed at this step saves it again; a kill before the rename below leaves no
        # step_<step>, and the run resumes from the checkpoint before it.
        remove_folder(final)
        os.replace(tmp, final)
        ckpts = sorted(root.glob("step_*"), key=lambda p: int(p.name[5:]))
        for old in ckpts[:-keep] if keep > 0 else []:
            remove_folder(old)
    accelerator.wait_for_everyone()


def resume(accelerator, out_dir: Path, setting: str, tracker,
           where: str = "step {}") -> tuple[int, dict]:
    """Load the checkpoint that ``setting`` names (``"auto"``: the latest in ``out_dir``;
    ``"never"``: none; else a checkpoint path) into the objects ``accelerator`` prepared and
    registered, and drop logged rows after it (all of them when nothing was loaded: a run that
    starts at 0 logs from scratch). Returns the step and the state saved with it (``{}``)."""
    ckpt = None
    if setting == "auto":
        ckpt = latest_checkpoint(out_dir)
    elif setting != "never":
        ckpt = Path(setting)
    if ckpt is None:
        tracker.truncate_after(0)
        return 0, {}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = {k: state.pop(k) for k in ("strategy", "processes") if k in state}
    if saved and saved != _layout(accelerator):
        raise ConfigError(f"the checkpoint {ckpt} was written by {saved}; this run is "
                          f"{_layout(accelerator)}: resume with the same train.strategy and number "
                          f"of processes (or train.resume=never)")
    accelerator.load_state(str(ckpt))
    step = state.pop("step")
    tracker.truncate_after(step)
    accelerator.print(f"alignkit: resumed from {ckpt} at {where.format(step)}")
    return step, state


def _layout(accelerator) -> dict:
    """How a sharded checkpoint is laid out (the strategy and its number of processes); {} for
    ddp, whose checkpoints load anywhere."""
    name = getattr(accelerator, "name", "ddp")
    return {} if name == "ddp" else {"strategy": name, "processes": accelerator.num_processes}


def optimizer_step(accelerator, optimizer, scheduler, params, max_grad_norm: float):
    """Clip the gradients of ``params`` to ``max_grad_norm`` (0: no clipping; the global norm
    over all shards under a sharded strategy), step the optimiser and the schedule, clear the
    gradients; returns the norm before clipping (None unclipped)."""
    return accelerator.optimizer_step(optimizer, scheduler, params, max_grad_norm)


def final_model(accelerator, model):
    """The trained ``model`` (as passed to :func:`train`) whole, on the main process, for
    :func:`alignkit.engine.models.save_model`; call it on every process (a sharded strategy
    gathers the weights). Other processes get None or their replica."""
    return accelerator.full_model(model)


def train(model: torch.nn.Module, items: Sequence[Any], *, lengths: Sequence[int],
          collate: Callable[[list[Any]], dict], weight_of: Callable[[Any], float],
          loss_fn: Callable[[torch.nn.Module, dict], LossOutput], loop: LoopConfig,
          optim: OptimConfig, out_dir: str | Path, tracker, accelerator,
          eval_fn: Callable[[torch.nn.Module], dict] | None = None) -> TrainResult:
    """Run the optimisation loop; returns the final step and metrics.

    The model is prepared here; afterwards ``accelerator.unwrap_model(model)`` is trained.
    """
    out_dir = Path(out_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    require(loop.batch_size % world == 0, f"train.batch_size={loop.batch_size} must be divisible "
            f"by the number of processes ({world})")
    per_epoch, total_steps = total_steps_for(len(items), loop)
    _seed_everything(loop.seed)

    optimizer = make_optimizer(model, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.announce()

    step, saved = resume(accelerator, out_dir, loop.resume, tracker, f"step {{}}/{total_steps}")

    batches_cache: dict[int, list[list[int]]] = {}
    last: dict[str, float] = saved.get("last_metrics", {})
    evals: dict[str, float] = saved.get("eval_metrics", {})
    # A run resumed at its end evaluated already (the final checkpoint follows the final eval).
    evaluated = step == total_steps and "eval_metrics" in saved
    model.train()
    bar = tracker.progress(total_steps, done=step)
    try:
        while step < total_steps:
            epoch, index = divmod(step, per_epoch)
            if epoch not in batches_cache:
                batches_cache.clear()
                batches_cache[epoch] = epoch_batches(lengths, loop.batch_size, loop.seed, epoch,
                                                     loop.group_by_length)
            global_batch = batches_cache[epoch][index]
            last = _optimizer_step(model, optimizer, scheduler, accelerator, items, global_batch,
                                   collate, weight_of, loss_fn, loop, optim, world, rank)
            step += 1
            bar.to(step)
            last["epoch"] = step / per_epoch
            if step % max(loop.log_every, 1) == 0 or step == total_steps:
                tracker.log(step, last)
            if eval_fn is not None and loop.eval_every > 0 and step % loop.eval_every == 0 \
                    and step < total_steps:
                evals = _run_eval(model, accelerator, eval_fn, tracker, step)
            if loop.save_every > 0 and step % loop.save_every == 0 and step < total_steps:
                save_checkpoint(accelerator, out_dir, step, loop.keep_checkpoints,
                                {"last_metrics": last})
    except KeyboardInterrupt:
        # Parameters and optimiser state are those after ``step`` completed steps: save them so
        # the run resumes from here.
        accelerator.print(f"alignkit: interrupted; saving a checkpoint at step {step}")
        save_checkpoint(accelerator, out_dir, step, loop.keep_checkpoints, {"last_metrics": last})
        raise
    finally:
        bar.close()
    if eval_fn is not None and not evaluated:
        evals = _run_eval(model, accelerator, eval_fn, tracker, step)
    final_state = {"last_metrics": last, **({"eval_metrics": evals} if eval_fn is not None else {})}
    save_checkpoint(accelerator, out_dir, step, loop.keep_checkpoints, final_state)
    return TrainResult(step=step, last_metrics=last, eval_metrics=evals,
                       distribution=accelerator.describe())


def _run_eval(model, accelerator, eval_fn, tracker, step) -> dict:
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(accelerator.unwrap_model(model))
    model.train()
    tracker.log(step, {f"eval/{k}": v for k, v in metrics.items()})
    return metrics


def _optimizer_step(model, optimizer, scheduler, accelerator, items, global_batch, collate,
                    weight_of, loss_fn, loop, optim, world, rank) -> dict[str, float]:
    global_weight = float(sum(weight_of(items[i]) for i in global_batch))
    shard = global_batch[rank::world]
    micro = [shard[s:s + loop.micro_batch_size] for s in range(0, len(shard), loop.micro_batch_size)]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    totals: set[str] = set()
    loss_sum = torch.zeros((), dtype=torch.float64)
    for k, idx in enumerate(micro):
        batch = collate([items[i] for i in idx])
        batch = to_device(batch, accelerator.device)
        sync = k == len(micro) - 1
        # A sharded strategy marks accumulation in one process too (DeepSpeed's boundary).
        accumulating = not sync and (world > 1 or getattr(accelerator, "name", "ddp") != "ddp")
        ctx = accelerator.no_sync(model) if accumulating else contextlib.nullcontext()
        with ctx:
            with accelerator.autocast():
                out = loss_fn(model, batch)
            loss = reduce_loss(out.values.float(), out.weights.float(), global_weight, world)
            accelerator.backward(loss)
        loss_sum += (out.values.float() * out.weights.float()).sum().detach().double().cpu()
        for name, (s, c) in out.metrics.items():
            sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64)) + \
                torch.as_tensor(s, dtype=torch.float64).detach().cpu()
            counts[name] = counts.get(name, 0.0) + (1.0 if c is None else float(c))
            if c is None:
                totals.add(name)
    grad_norm = optimizer_step(accelerator, optimizer, scheduler, model.parameters(),
                               optim.max_grad_norm)

    names = sorted(sums)
    packed = torch.stack([loss_sum] + [sums[n] for n in names]
                         + [torch.tensor(counts[n], dtype=torch.float64) for n in names])
    if world > 1:
        packed = accelerator.reduce(packed.to(accelerator.device), reduction="sum").cpu()
    out_metrics = {"loss": float(packed[0]) / global_weight,
                   "lr": scheduler.get_last_lr()[0]}
    for j, n in enumerate(names):
        out_metrics[n] = float(packed[1 + j]) if n in totals else \
            float(packed[1 + j]) / max(float(packed[1 + len(names) + j]), 1e-12)
    if grad_norm is not None:
        out_metrics["grad_norm"] = float(grad_norm)
    return out_metrics


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
