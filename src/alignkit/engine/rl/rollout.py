"""One iteration's experience for PPO, RLOO and GRPO: sample, score, and the no-grad forwards.

prompts --:func:`~alignkit.engine.sampling.sample`--> responses with their recorded log-probs
--decode--> reward source (text in, floats out) --> scores; then, without gradients, the
training forward of the policy (the ``old_logps`` of the importance ratio), the reference's
log-probs and the values.

The ratio uses the training forward's log-probs, not the recorded ones, so it is exactly 1 before
the first update whatever the sampler's numerics; the recorded ones serve to check that the two
agree (``logprob_gap_max`` and ``logprob_gap_mean`` over response tokens: a gap beyond float error
means generation and training see different tokens, positions or padding, or, with
``sampling.engine=vllm``, measures how far the engine's kernels are from the trainer's, which
``ppo.tis_cap`` corrects). On an engine other than hf the old log-probs are always recomputed.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

from alignkit.config import require
from alignkit.engine.generation import Rollout, base_seed, rollout_logps
from alignkit.engine.sampling import SamplingConfig, sample
from alignkit.engine.workers import WorkersConfig


@dataclass(frozen=True)
class RolloutConfig:
    prompts: str | None = None        # "task:NAME[:chat]" (train split) or a file of prompt records
    num_prompts: int = 0              # size of the prompt pool (0: all)
    prompts_per_iteration: int = 32
    samples_per_prompt: int = 1       # k; RLOO and GRPO need k >= 2
    batch_size: int = 64              # rows per generation chunk
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Old log-probs = those recorded while sampling (equal to a forward pass's within float
    # error): one policy forward fewer per iteration. logprob_gap_max is then measured on the
    # first training forward, before the first update.
    reuse_sampling_logps: bool = False

    def __post_init__(self):
        require(self.prompts_per_iteration > 0, "rollout.prompts_per_iteration must be > 0")
        require(self.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1")
        require(not (self.reuse_sampling_logps and self.sampling.engine != "hf"),
                f"rollout.reuse_sampling_logps needs rollout.sampling.engine=hf: the log-probs of "
                f"{self.sampling.engine!r} come from its own kernels, so the trainer recomputes them")

    @property
    def rows(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


@dataclass
class Experience:
    """Rollout rows and their per-token tensors (``[B, R]`` aligned with ``response_ids``)."""

    rollout: Rollout
    old_logps: torch.Tensor                  # policy, training forward, before this update
    ref_logps: torch.Tensor
    values: torch.Tensor | None = None       # value model before this update (PPO only)
    advantages: torch.Tensor | None = None   # [B, R] per token or [B] per sequence
    returns: torch.Tensor | None = None      # value targets [B, R] (PPO only)

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def __len__(self) -> int:
        return self.rollout.response_ids.size(0)

    def take(self, idx) -> Experience:
        """Rows ``idx``, without the columns that are padding in all of them (less compute)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.mask.device)
        r = self.rollout
        prompt_mask = r.prompt_mask[idx]
        lead = int((prompt_mask.sum(0) == 0).sum())  # left padding common to every row
        width = max(int(r.response_mask[idx].sum(-1).max()), 1)
        rows = Rollout(prompt_ids=r.prompt_ids[idx, lead:], prompt_mask=prompt_mask[:, lead:],
                       response_ids=r.response_ids[idx, :width],
                       response_mask=r.response_mask[idx, :width], logps=r.logps[idx, :width],
                       finished=r.finished[idx])

        def cut(x):
            if x is None:
                return None
            return x[idx, :width] if x.dim() == 2 else x[idx]

        return replace(self, rollout=rows, **{f.name: cut(getattr(self, f.name))
                                              for f in fields(self) if f.name != "rollout"})


@dataclass
class Sampled:
    """What one iteration sampled and how it scored, for the algorithms and the metrics."""

    experience: Experience
    prompts: list[str]
    responses: list[str]
    proxy: torch.Tensor            # [B] raw reward-source scores
    gold: torch.Tensor | None      # [B] the task's gold reward (reporting only)
    logprob_gap_max: float         # max |trainer - sampler| log-prob over response tokens
    generation_seconds: float
    logprob_gap_mean: float = float("nan")   # its mean over response tokens


def collect(roles, prompt_ids: list[list[int]], prompts: list[str], tokenizer,
            sampling: SamplingConfig, generator: torch.Generator, *, batch_size: int,
            gold=None, recompute_logps: bool = True, pack: bool | str = False,
            workers: WorkersConfig | None = None, sampler=None, rank: int = 0,
            world: int = 1) -> Sampled:
    """Sample one response per prompt row, score it, and run the no-grad forwards.

    ``sampler``: the unsharded policy to sample from and to compute the old log-probs with (the
    strategy's rollout copy; default ``roles.policy``). With ``world`` > 1 processes, process
    ``rank`` takes rows ``rank * n / world ..`` (equal shares: the forwards of sharded models
    run in lockstep), each row seeded as the whole call would seed it, and the shares are then
    all-gathered: every process returns the whole iteration's experience, equal to one
    process's up to the float rounding of differently padded batches.

    ``recompute_logps=False`` takes the log-probs recorded while sampling as the old policy's
    (one policy forward fewer); ``logprob_gap_max`` is then NaN here and the caller measures the
    gap on its first training forward. ``pack``: the forwards on the real tokens only
    (:func:`~alignkit.engine.generation.rollout_logps`). ``workers``: where the sampling runs
    (the policy's current weights are sent to the actors when they changed)."""
    roles.train(False)
    sampler = roles.policy if sampler is None else sampler
    start = time.perf_counter()
    seed = base_seed(generator)       # one draw on every process: the generators stay equal
    share = len(prompt_ids) // world
    lo, hi = rank * share, (rank + 1) * share
    prompt_ids, prompts = prompt_ids[lo:hi], prompts[lo:hi]
    rollout = sample(sampler, prompt_ids, sampling, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, seed=seed, first_row=lo,
                     batch_size=batch_size, workers=workers)
    seconds = time.perf_counter() - start
    responses = rollout.decode(tokenizer)
    proxy = torch.tensor(roles.reward(prompts, responses), dtype=torch.float32)
    gold_scores = torch.tensor(gold(prompts, responses), dtype=torch.float32) if gold else None
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    with torch.no_grad():
        old_logps = (rollout_logps(sampler, rollout, temperature, pack) if recompute_logps
                     else rollout.logps)
        ref_logps = rollout_logps(roles.reference, rollout, temperature, pack)
        values = roles.values(rollout, pack) if roles.value is not None else None
    if world > 1:
        rollout, old_logps, ref_logps, values, proxy, gold_scores, prompts, responses, seconds = \
            _all_gather(world, tokenizer.pad_token_id, rollout, old_logps, ref_logps, values,
                        proxy, gold_scores, prompts, responses, seconds)
    gap_max = gap_mean = float("nan")
    if recompute_logps:
        gaps = (old_logps - rollout.logps).abs() * rollout.response_mask
        gap_max = float(gaps.max())
        gap_mean = float(gaps.sum() / rollout.response_mask.sum().clamp_min(1))
    return Sampled(Experience(rollout, old_logps, ref_logps, values), prompts, responses,
                   proxy.to(old_logps.device), gold_scores, gap_max, seconds, gap_mean)


def _all_gather(world: int, pad_token_id: int, rollout: Rollout, old_logps, ref_logps, values,
                proxy, gold, prompts, responses, seconds):
    """Every process's share of the rows, concatenated in rank order (the rows' order in one
    process); prompts padded on the left, responses and per-token tensors on the right, to the
    widest share."""
    import torch.distributed as dist

    local = {"rollout": {k: v.cpu() for k, v in vars(rollout).items() if torch.is_tensor(v)},
             "old": old_logps.cpu(), "ref": ref_logps.cpu(),
             "values": None if values is None else values.cpu(), "proxy": proxy.cpu(),
             "gold": gold, "prompts": prompts, "responses": responses, "seconds": seconds}
    shares: list = [None] * world
    dist.all_gather_object(shares, local)
    device = old_logps.device
    width_p = max(s["rollout"]["prompt_ids"].size(1) for s in shares)
    width_r = max(s["rollout"]["response_ids"].size(1) for s in shares)

    def cat(get, width, left=False, value=0):
        parts = []
        for s in shares:
            x = get(s)
            pad = (width - x.size(1), 0) if left else (0, width - x.size(1))
            parts.append(torch.nn.functional.pad(x, pad, value=value))
        return torch.cat(parts).to(device)

    r = lambda k: (lambda s: s["rollout"][k])   # noqa: E731
    gathered = Rollout(prompt_ids=cat(r("prompt_ids"), width_p, True, pad_token_id),
                       prompt_mask=cat(r("prompt_mask"), width_p, True),
                       response_ids=cat(r("response_ids"), width_r, value=pad_token_id),
                       response_mask=cat(r("response_mask"), width_r),
                       logps=cat(r("logps"), width_r),
                       finished=torch.cat([s["rollout"]["finished"] for s in shares]).to(device))
    return (gathered, cat(lambda s: s["old"], width_r), cat(lambda s: s["ref"], width_r),
            None if values is None else cat(lambda s: s["values"], width_r),
            torch.cat([s["proxy"] for s in shares]),
            None if gold is None else torch.cat([s["gold"] for s in shares]),
            [p for s in shares for p in s["prompts"]], [t for s in shares for t in s["responses"]],
            max(s["seconds"] for s in shares))


def encoded_prompts(spec: str, n: int, tokenizer) -> tuple[list[str], list[list[int]]]:
    """Prompt texts (what reward sources read) and their token ids (what the policy continues)
    of ``spec``: ``task:NAME[:chat]`` (the task's train prompts) or a file of prompt records
    (``{"prompt": ...}`` or ``{"messages": [...]}``, encoded as they are); ``n`` > 0 keeps the
    first ``n``."""
    from alignkit.data.formats import prompt_ids
    from alignkit.data.sources import load_prompt_records, prompt_text

    records = load_prompt_records(spec, "train", n)
    return [prompt_text(r) for r in records], [prompt_ids(r, tokenizer) for r in records]


def rollout_packing(models, requested: bool | str, on_whole=None) -> bool | str:
    """How the forwards over rollouts pack (``rollout_logps``'s ``pack``) given the setting
    ``requested`` (``ppo.packing``): ``"shared"`` (each prompt written once for its group's rows)
    where every model that reads rollouts lets a segment attend to the prompt of the one before
    it, else ``True`` (one flat row) where each keeps attention to each sequence of a flat row
    (``alignkit.engine.attention.flat_packing`` switches transformers' SDPA to one that does
    both), else ``False``; ``False`` if ``requested`` is off. ``on_whole``: the training
    strategy's (``Strategy.on_whole``), which probes a model it built sharded on the main
    process's whole copy and sends the answer to every process."""
    from alignkit.engine.attention import flat_packing
    from alignkit.engine.forward import supports_packing

    if not requested:
        return False
    on_whole = on_whole or (lambda model, fn: fn(model))
    switched = [flat_packing(m) for m in models]   # on every process: the attention it runs
    if not (all(switched) and all(on_whole(m, lambda w: flat_packing(w) and
                                           supports_packing(w, "flat")) for m in models)):
        return False
    return "shared" if all(on_whole(m, lambda w: supports_packing(w, "shared"))
                           for m in models) else True


def iteration_prompts(pool: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of ``iteration``: consecutive slices of per-epoch shuffles of the
    pool, a pure function of its arguments (nothing to checkpoint)."""
    start = iteration * per_iteration
    out: list[int] = []
    while len(out) < per_iteration:
        epoch, offset = divmod(start + len(out), pool)
        order = list(range(pool))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.extend(order[offset:offset + per_iteration - len(out)])
    return out


class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch (Chan, Golub &
    LeVeque 1979, the pairwise update); the state of reward normalisation across iterations."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass(frozen=True)
class ScoreConfig:
    """How a reward-source score becomes the training score (before any KL shaping)."""

    normalize: Literal["none", "scale", "standardize"] = "none"  # by the running std (and mean)
    clip: float | None = None          # clip to [-clip, clip] after normalising
    no_eos_penalty: float = 0.0        # subtracted from responses that never produced EOS

    def __post_init__(self):
        require(self.clip is None or self.clip > 0, "score.clip must be > 0 (or null)")
        require(self.no_eos_penalty >= 0, "score.no_eos_penalty must be >= 0")


def training_scores(proxy: torch.Tensor, finished: torch.Tensor, cfg: ScoreConfig,
                    moments: RunningMoments) -> torch.Tensor:
    """Penalise unfinished responses, normalise by running moments (updated with this batch
    first), clip. ``[B] -> [B]``."""
    scores = proxy - cfg.no_eos_penalty * (~finished.bool()).to(proxy.dtype)
    if cfg.normalize != "none":
        moments.update(scores)
        shift = moments.mean if cfg.normalize == "standardize" else 0.0
        scores = (scores - shift) / (moments.std + 1e-8)
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


class GeneratorState:
    """Checkpointable holder of the ``torch.Generator`` that draws samples and minibatches. It
    lives on the CPU whatever the model's device (``generate`` moves the uniforms it draws; the
    minibatch order is a CPU ``randperm``), so a run samples the same on every device."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])
