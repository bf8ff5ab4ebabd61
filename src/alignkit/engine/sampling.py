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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from alignkit.engine.generation import Rollout, generate
from alignkit.engine.workers import WorkersConfig, run as run_workers


class SamplingBackend(Protocol):
    def __call__(self, model, prompt_ids: list[list[int]], cfg: SamplingConfig, *,
                 eos_token_id: int, pad_token_id: int, generator: torch.Generator | None,
                 batch_size: int | None) -> Rollout: ...


def _hf_rows(model, prompt_ids, cfg, *, eos_token_id, pad_token_id, seeds, batch_size):
    """INTERIM (until main's per-row seeds land): each row alone with its own seed."""
    from alignkit.engine.workers import concat_rollouts

    return concat_rollouts([generate(model, [row], cfg, eos_token_id=eos_token_id,
                                     pad_token_id=pad_token_id,
                                     generator=torch.Generator().manual_seed(s))
                            for row, s in zip(prompt_ids, seeds)], pad_token_id)


def row_seeds(base_seed: int, n: int) -> list[int]:
    """INTERIM: one seed per row."""
    g = torch.Generator().manual_seed(base_seed)
    return torch.randint(0, 2**62, (n,), generator=g).tolist()


BACKENDS: dict[str, SamplingBackend] = {"hf": _hf_rows}


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
    # model's own weights (:mod:`alignkit.engine.generation`).
    engine: str = "hf"

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
        if self.engine not in BACKENDS:
            raise ValueError(f"sampling engine {self.engine!r} is not one of {sorted(BACKENDS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(model, prompt_ids: list[list[int]], cfg: SamplingConfig, *, eos_token_id: int,
           pad_token_id: int, generator: torch.Generator | None = None,
           batch_size: int | None = None, workers: WorkersConfig | None = None,
           seed: int | None = None) -> Rollout:
    """One response per prompt (token ids), drawn by the backend ``cfg.engine``, in this process
    or on the Ray actors of ``workers`` (:mod:`alignkit.engine.workers`)."""
    n = len(prompt_ids)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    seeds = row_seeds(seed, n)
    return run_workers(model, prompt_ids, cfg, eos_token_id=eos_token_id,
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
    """One response per prompt text (a user turn with ``chat``), drawn from a generator seeded
    with ``seed``; returns the rollout and the decoded responses."""
    ids = encode_prompts(prompts, tokenizer, chat)
    rollout = sample(model, ids, cfg, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(seed), batch_size=batch_size,
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
