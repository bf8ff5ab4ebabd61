"""The one sampling entry point: prompts in, responses with token ids and log-probs out.

Every stage that samples goes through here: PPO / RLOO / GRPO rollouts (:func:`sample`, on token
ids), and ReST's Grow, ``label``, online DPO rounds, best-of-n and ``evaluate`` (:func:`sample_texts`,
on prompt texts, the responses decoded); so do the AI judge's generations and the server. What
comes back is a :class:`~alignkit.engine.generation.Rollout`: left-padded prompts, right-padded
responses, the log-prob of every sampled token, and whether each row finished (produced EOS).

The backend that draws is chosen by ``SamplingConfig.engine`` from :data:`BACKENDS`, the one
registry of sampling engines: ``hf``, alignkit's batched KV-cache decoder for any Hugging Face
causal LM (:func:`alignkit.engine.generation.generate`). Another engine is one entry there with
the same contract; no stage changes.

Where the backend runs is the ``workers`` argument (a stage's ``workers`` section): in this
process, or on Ray actors that each sample chunks of the rows (:mod:`alignkit.engine.workers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from alignkit.engine.generation import Rollout, base_seed, generate, row_seeds
from alignkit.engine.vllm_engine import sample_vllm
from alignkit.engine.workers import WorkersConfig, run as run_workers


class SamplingBackend(Protocol):
    """A sampling engine. ``seeds[i]`` is the seed of prompt row ``i`` (in [0, 2**63)): a row's
    draw depends only on its prompt, its seed and the weights, never on which rows share its
    batch or on ``batch_size`` (up to the float rounding of batched arithmetic), so that any split
    of a call's rows (chunks, workers) samples what the whole call would."""

    def __call__(self, model, prompt_ids: list[list[int]], cfg: SamplingConfig, *,
                 eos_token_id: int, pad_token_id: int, seeds: list[int],
                 batch_size: int | None) -> Rollout: ...


BACKENDS: dict[str, SamplingBackend] = {"hf": generate, "vllm": sample_vllm}


@dataclass(frozen=True)
class SamplingConfig:
    """How to draw a response. ``temperature == 0`` means greedy (top-k/top-p are then moot)."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Run the one-token decode step through torch.compile (see generate()): 1.3-1.5x faster decoding
    # of small models on CPU once compiled; the first call pays the compilation.
    compile: bool = False
    # Which backend of BACKENDS draws the samples: "hf", alignkit's KV-cache decoder on the
    # model's own weights (:mod:`alignkit.engine.generation`); "vllm", a vLLM engine beside the
    # trainer, its weights synced from the model before each draw (:mod:`alignkit.engine.vllm_engine`).
    engine: str = "hf"
    # engine=vllm: memory of its paged KV cache, GiB (CPU RAM on a CPU machine, GPU memory on a
    # GPU); it bounds how many tokens are in flight at once. Read when the engine starts.
    vllm_kv_cache_gib: float = 1.0

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filtering), got {self.top_k!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if not is_real(self.vllm_kv_cache_gib) or self.vllm_kv_cache_gib <= 0:
            raise ValueError(f"vllm_kv_cache_gib must be a number > 0, got {self.vllm_kv_cache_gib!r}")
        if self.engine not in BACKENDS:
            raise ValueError(f"sampling engine {self.engine!r} is not one of {sorted(BACKENDS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(model, prompt_ids: list[list[int]], cfg: SamplingConfig, *, eos_token_id: int,
           pad_token_id: int, generator: torch.Generator | None = None, seed: int | None = None,
           batch_size: int | None = None, workers: WorkersConfig | None = None,
           first_row: int = 0) -> Rollout:
    """One response per prompt (token ids), drawn by the backend ``cfg.engine``. Row ``i`` is
    seeded with ``row_seeds(seed, n, first_row)[i]``; without ``seed``, the base seed is one draw
    of ``generator`` (a stage that checkpoints its generator resumes with the same draws).
    ``first_row``: these rows are rows ``first_row ..`` of a larger call (a process's share of
    it), so each samples what the whole call would give it.
    ``workers``: where the backend runs, in this process (default) or on Ray actors
    (:mod:`alignkit.engine.workers`); the rows and their seeds are the same either way."""
    n = len(prompt_ids)
    seeds = row_seeds(seed if seed is not None else base_seed(generator), n, first_row)
    return run_workers(BACKENDS[cfg.engine], model, prompt_ids, cfg, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, seeds=seeds, batch_size=batch_size,
                       workers=workers)


def encode_prompts(prompts: list[str], tokenizer, chat: bool) -> list[list[int]]:
    """Prompt token ids exactly as the data layer builds them for training."""
    from alignkit.data.formats import prompt_ids
    from alignkit.data.sources import prompt_records

    return [prompt_ids(r, tokenizer) for r in prompt_records(prompts, chat)]


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], cfg: SamplingConfig, *, chat: bool,
                 seed: int, batch_size: int = 64,
                 workers: WorkersConfig | None = None) -> tuple[Rollout, list[str]]:
    """One response per prompt text (a user turn with ``chat``), row ``i`` seeded with
    ``row_seeds(seed, n)[i]``; returns the rollout and the decoded responses."""
    ids = encode_prompts(prompts, tokenizer, chat)
    rollout = sample(model, ids, cfg, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, seed=seed, batch_size=batch_size,
                     workers=workers)
    return rollout, rollout.decode(tokenizer)


def sample_pairs(model, tokenizer, prompts: list[str], cfg: SamplingConfig, *, chat: bool,
                 seed: int, batch_size: int = 64,
                 workers: WorkersConfig | None = None) -> list[dict]:
    """Two responses per prompt, ``{"prompt", "response_a", "response_b"}``: the pairs that
    annotators, judges or a reward source then label."""
    doubled = [p for p in prompts for _ in range(2)]
    _, texts = sample_texts(model, tokenizer, doubled, cfg, chat=chat, seed=seed,
                            batch_size=batch_size, workers=workers)
    return [{"prompt": p, "response_a": texts[2 * i], "response_b": texts[2 * i + 1]}
            for i, p in enumerate(prompts)]


def informative_pairs(pairs: list[dict]) -> list[dict]:
    """The pairs that can carry a preference: two non-empty, different responses (the data
    layer refuses the others as training pairs)."""
    return [p for p in pairs if p["response_a"].strip() and p["response_b"].strip()
            and p["response_a"] != p["response_b"]]
