"""alignkit side of each benchmark case (runs in the project venv, one case per process).

Every case drives alignkit's own code path, the same one the stage's ``main`` uses:
``alignkit.engine.training.train`` with the stage's loss and collate functions, ``build_dataset`` for
tokenisation, ``cache_reference`` for DPO, ``alignkit.engine.sampling.sample`` for sampling. Only the
tracker is replaced, by a clock that marks the end of every optimiser step.
"""

from __future__ import annotations

import tempfile
import time

import torch

from common import (CountingCollate, StepClock, load_jsonl, rl_result, sampling_result,
                    training_result)


class ClockTracker:
    """Stands in for ``alignkit.tracking.Tracker``: ``train`` calls ``log`` after every step
    (``log_every=1``). It offers every method a stage calls on a tracker
    (tests/bench/test_bench_scripts.py checks that against the package's calls)."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def log(self, step, metrics, echo=True):
        self.clock.mark()

    def truncate_after(self, step):
        pass

    def progress(self, total, done=0, unit="step"):
        from alignkit.tracking import Progress

        return Progress(total, "bench", unit, done=done, enabled=False, lines=False)

    def finish(self, metrics):
        return metrics


class ClockRLTracker(ClockTracker):
    """The RL loop's stand-in (``ppo.main`` makes it as ``Tracker(out, cfg, stage=...)``): one
    mark per iteration, and the tokens each iteration generated."""

    def __init__(self, clock: StepClock, rows: int):
        super().__init__(clock)
        self.rows = rows
        self.gen_tokens: list[int] = []

    def log(self, step, metrics, echo=True):
        super().log(step, metrics, echo)
        self.gen_tokens.append(round(metrics["response_length"] * self.rows))


def _loop(spec: dict):
    from alignkit.engine.training import LoopConfig, OptimConfig

    loop = LoopConfig(max_steps=spec["warmup"] + spec["steps"], batch_size=spec["batch"],
                      micro_batch_size=spec["batch"], log_every=1, save_every=0, seed=spec["seed"],
                      group_by_length=True,  # as the peer's train_sampling_strategy
                      mixed_precision="bf16" if spec["precision"] == "bf16" else "no",
                      resume="never")
    # Constant LR, clipping at 1.0: the peer is configured the same way.
    optim = OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0, max_grad_norm=1.0)
    return loop, optim


def _train(spec, model, examples, lengths, collate, weight_of, loss_fn, extra=None):
    from alignkit.engine.training import make_accelerator, train

    loop, optim = _loop(spec)
    accelerator = make_accelerator(loop.mixed_precision)
    counter = CountingCollate(collate)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        train(model, examples, lengths=lengths, collate=counter, weight_of=weight_of,
              loss_fn=loss_fn, loop=loop, optim=optim, out_dir=out, tracker=ClockTracker(clock),
              accelerator=accelerator)
    return training_result(clock, counter, spec["warmup"], spec["steps"], spec["batch"], extra)


def _pack(spec, model, pairs: bool = False) -> str | None:
    """The stage's packing layout (``train.packing``, on by default; ``training.use_packing``)."""
    from alignkit.engine.training import use_packing

    return use_packing(model, _loop(spec)[0], pairs=pairs)


def _records(spec, kind, n, keys):
    return [{k: r[k] for k in keys} for r in load_jsonl(f"{spec['data_dir']}/{kind}.jsonl", n)]


def _dataset_shape(examples, fields=("input_ids",)) -> dict:
    """Token count and the token-weighted mean sequence length (sum n^2 / sum n: the context a
    token attends over, for the attention FLOPs of MFU) of the sequences under ``fields``."""
    lengths = [len(e[f]) for e in examples for f in fields]
    return {"dataset_tokens": sum(lengths),
            "attention_context": sum(n * n for n in lengths) / sum(lengths)}


def sft(spec):
    from alignkit.data.collate import collate_rows
    from alignkit.data.formats import build_dataset
    from alignkit.math.logprobs import IGNORE_INDEX
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.forward import last_mlp
    from alignkit.engine.lm_loss import loss_for, n_targets

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    tok = load_tokenizer(spec["model_dir"])
    examples, _ = build_dataset(_records(spec, "sft", n, ("prompt", "completion")), tok,
                                format="prompt_completion", max_length=spec["max_len"])
    model = load_causal_lm(spec["model_dir"], tokenizer=tok)
    pad, pack = tok.pad_token_id, _pack(spec, model)
    loss = loss_for(model, pack)   # as `alignkit sft` trains
    scored = []   # per batch: the rows the LM head computes (positions with a target, every row)

    def collate(b):
        batch = collate_rows(b, pad, pack)
        has_target = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0)
        scored.append(int(has_target.sum()) * batch["labels"].size(0))
        return batch

    result = _train(spec, model, examples, [len(e["input_ids"]) for e in examples], collate,
                    n_targets, loss, _dataset_shape(examples))
    # For MFU: the LM head (and where checked, the last MLP) runs at those rows only; its FLOPs
    # elsewhere are not spent.
    w, n = spec["warmup"], spec["steps"]
    result.update(skipped_head_params=model.get_output_embeddings().weight.numel(),
                  scored_tokens_per_s=sum(scored[w:w + n]) / result["seconds"])
    if loss.keywords["last_rows_only"]:
        result["skipped_mlp_params"] = sum(p.numel() for p in last_mlp(model).parameters())
    return result


def rm(spec):
    from alignkit.data.collate import collate_preference
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import load_scalar_model, load_tokenizer
    from alignkit.engine.forward import last_mlp
    from alignkit.engine.rm_loss import make_loss, supports_last_rows_only

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    tok = load_tokenizer(spec["model_dir"])
    examples, _ = build_dataset(_records(spec, "pref", n, ("prompt", "chosen", "rejected")), tok,
                                format="preference", max_length=spec["max_len"])
    model = load_scalar_model(spec["model_dir"], tokenizer=tok)
    pad, pack = tok.pad_token_id, _pack(spec, model, pairs=True)
    lengths = [max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples]
    only = pack is not None and supports_last_rows_only(model, pack)
    extra = _dataset_shape(examples, ("chosen_input_ids", "rejected_input_ids"))
    if only:  # for MFU: the last MLP's FLOPs are not spent on unscored tokens (2 scored per pair)
        extra.update(skipped_mlp_params=sum(p.numel() for p in last_mlp(model).parameters()),
                     scored_per_item=2)
    return _train(spec, model, examples, lengths, lambda b: collate_preference(b, pad, pack),
                  lambda e: 1.0, make_loss(0.0, only), extra)


def dpo(spec):
    from alignkit.data.formats import build_dataset
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.dap_loss import LossConfig, cache_reference, collate_dap, make_loss

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    tok = load_tokenizer(spec["model_dir"])
    examples, _ = build_dataset(_records(spec, "pref", n, ("prompt", "chosen", "rejected")), tok,
                                format="preference", max_length=spec["max_len"])
    t0 = time.perf_counter()
    # The reference is the initial policy: a second copy, used once, as `alignkit dpo` does.
    reference = load_causal_lm(spec["model_dir"], tokenizer=tok)
    cache_reference(reference, examples, tok.pad_token_id, batch_size=spec["batch"],
                    pack=_pack(spec, reference, pairs=True))
    del reference
    ref_s = time.perf_counter() - t0
    model = load_causal_lm(spec["model_dir"], tokenizer=tok)
    pad, pack = tok.pad_token_id, _pack(spec, model, pairs=True)
    lengths = [sum(len(e[k]) for k in e if k.endswith("input_ids")) for e in examples]
    return _train(spec, model, examples, lengths, lambda b: collate_dap(b, pad, pack), lambda e: 1.0,
                  make_loss(LossConfig(name="dpo", beta=0.1)),
                  {**_dataset_shape(examples, ("chosen_input_ids", "rejected_input_ids")),
                   "ref_precompute_s": ref_s})


def sample(spec):
    from alignkit.data.formats import encode_prompt
    from alignkit.engine.models import load_causal_lm, load_tokenizer
    from alignkit.engine.sampling import SamplingConfig
    from alignkit.engine.sampling import sample as generate

    tok = load_tokenizer(spec["model_dir"])
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = load_causal_lm(spec["model_dir"], dtype=dtype, tokenizer=tok).eval()
    prompts = [encode_prompt(r["prompt"], tok) for r in load_jsonl(f"{spec['data_dir']}/prompts.jsonl")]
    b = spec["batch"]
    cfg = SamplingConfig(max_new_tokens=spec["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                         compile=spec.get("compile", False))
    gen = torch.Generator().manual_seed(spec["seed"])
    times, tokens = [], []
    for rep in range(spec["warmup"] + spec["steps"]):
        batch = [prompts[(rep * b + i) % len(prompts)] for i in range(b)]
        t = time.perf_counter()
        out = generate(model, batch, cfg, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, generator=gen)
        times.append(time.perf_counter() - t)
        tokens.append(int(out.response_mask.sum()))
    return sampling_result(spec, times, tokens)


# Driven through the stage itself, `alignkit.stages.ppo.main` (rollout -> reward -> advantages -> update, as
# `alignkit ppo` runs it); its tracker is replaced by a clock that `main` calls after every
# iteration. Evaluation is off; the final checkpoint/save happen after the timed iterations.


def _rl(spec, algo: str, roles: str = "separate"):
    from alignkit import tracking
    from alignkit.config import build
    from alignkit.stages import ppo

    k = spec.get("k", 1)
    p = spec["prompts_per_iter"]
    rows = p * k
    beta = {"grpo": 0.04, "rloo": 0.05, "ppo": 0.05}[algo]
    tracker = ClockRLTracker(StepClock(), rows)
    tracking.Tracker = lambda *a, **kw: tracker  # ppo.main imports it from alignkit.tracking at call time
    optim = {"lr": 1e-5, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": 1.0}
    # PPO with separate roles scores with a reward model, as the peer does (the model folder with
    # a fresh score head: a fourth model in memory and a forward per rollout); the shared
    # placement would need that RM as an adapter on its base, and the critic-free cases use the
    # cheap text function on both sides.
    reward = (f"model:{spec['model_dir']}" if algo == "ppo" and roles == "separate"
              else "python:common:reward_of_texts")
    with tempfile.TemporaryDirectory() as out:
        cfg = build(ppo.Config, {   # the settings `alignkit ppo --config` would read
            "model": spec["model_dir"], "reward": reward, "out_dir": out,
            "iterations": spec["warmup"] + spec["steps"], "roles": roles,
            "rollout": {"prompts": f"{spec['data_dir']}/prompts.jsonl",
                        "prompts_per_iteration": p, "samples_per_prompt": k, "batch_size": rows,
                        "reuse_sampling_logps": spec.get("reuse_logps", False),
                        "sampling": {"max_new_tokens": spec["new_tokens"], "temperature": 1.0,
                                     "top_p": 1.0, "top_k": 0,
                                     "compile": spec.get("compile", False),
                                     "engine": spec.get("engine", "hf")}},
            "kl": {"beta": beta},
            "ppo": {"algo": algo, "epochs": spec.get("ppo_epochs", 1), "minibatch_size": rows,
                    "micro_batch_size": spec.get("micro_batch", rows),
                    "packing": spec.get("packing", True)},
            "optim": optim, "value_optim": optim, "eval": {"num_prompts": 0, "initial": False},
            "seed": spec["seed"], "resume": "never", "tensorboard": False,
            "mixed_precision": "bf16" if spec["precision"] == "bf16" else "no"})
        final = ppo.main(cfg)
    return {**rl_result(spec, tracker.clock, tracker.gen_tokens, rows), "roles": roles,
            **{k: v for k, v in final.items() if "memory" in k or "params" in k}}


def grpo(spec):
    return _rl(spec, "grpo")


def rloo(spec):
    return _rl(spec, "rloo")


def ppo(spec):
    return _rl(spec, "ppo")


def ppo_shared(spec):
    """PPO with roles="shared" (one backbone, LoRA adapters); compare its peak RSS with `ppo`."""
    return _rl(spec, "ppo", roles="shared")


CASES = {"sft": sft, "rm": rm, "dpo": dpo, "sample": sample, "grpo": grpo, "rloo": rloo, "ppo": ppo,
         "ppo_shared": ppo_shared,
         # the same iterations with rollouts on the vLLM backend (the spec's engine="vllm")
         "grpo_vllm": grpo, "rloo_vllm": rloo}
