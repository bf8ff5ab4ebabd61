"""Peer side of each benchmark case: TRL trainers and ``transformers`` ``generate``.

Runs in the peer's own venv (bench/.venv-trl: trl 1.16; bench/.venv-trl-ppo: the last TRL release
with a PPOTrainer). Each trainer gets the same model folder, the same text records, the same
batch size, learning rate, clipping and precision as the alignkit side, in its fastest documented
configuration for those semantics: gradient checkpointing off (TRL's default is on), length-grouped
sampling (alignkit's default), no logging/saving/evaluation, reference log-probs precomputed
for DPO. Timing and token counting are identical to the alignkit side (bench/common.py).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

from common import (CountingCollate, Skip, StepClock, load_jsonl, reward_of_ids, rl_result,
                    sampling_result, training_result)


def _clock_callback(clock: StepClock, counter: CountingCollate | None):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if counter is not None:
                counter.reset()  # drop batches collated before training (e.g. DPO's precompute)

        def on_step_end(self, args, state, control, **kw):
            clock.mark()

    return Clock()


def _common_args(spec: dict, out: str, group_by_length: bool = True) -> dict:
    args = dict(
        output_dir=out, max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=spec["precision"] == "bf16", use_cpu=True,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"],
    )
    if group_by_length:
        args.update(train_sampling_strategy="group_by_length", length_column_name="length")
    return args


def _tokenizer(spec):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec["model_dir"])


def _ensure_length_column(trainer):
    """Length-grouped sampling (``train_sampling_strategy="group_by_length"``) reads a ``length``
    column, but the RM and DPO trainers drop every column their collator does not use before the
    sampler sees the dataset. Give the sampler the lengths of the tokenised rows directly."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    d = trainer.train_dataset
    if trainer.args.train_sampling_strategy != "group_by_length" or "input_ids" in d.column_names:
        return
    cols = [c for c in d.column_names if c.endswith("_ids")]
    lengths = [sum(len(x) for x in row) for row in zip(*(d[c] for c in cols))]
    batch = trainer.args.per_device_train_batch_size
    trainer._get_train_sampler = lambda *a, **k: LengthGroupedSampler(batch, lengths=lengths)


def _run(spec, trainer, extra=None):
    _ensure_length_column(trainer)
    clock = StepClock()
    counter = CountingCollate(trainer.data_collator)
    trainer.data_collator = counter
    trainer.add_callback(_clock_callback(clock, counter))
    trainer.train()
    return training_result(clock, counter, spec["warmup"], spec["steps"], spec["batch"],
                           {**(extra or {}), "activation_checkpointing": _checkpointing(trainer)})


def _checkpointing(trainer) -> bool:
    m = trainer.model
    return bool(getattr(m, "is_activation_checkpointing", None)
                if hasattr(m, "is_activation_checkpointing") else m.is_gradient_checkpointing)


def _column_tokens(dataset, columns) -> int:
    return sum(len(x) for c in columns if c in dataset.column_names for x in dataset[c])


def sft(spec):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    rows = load_jsonl(f"{spec['data_dir']}/sft.jsonl", n)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "length")} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**_common_args(spec, out), max_length=spec["max_len"],
                         completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer(spec))
        return _run(spec, trainer, {"dataset_tokens": _column_tokens(trainer.train_dataset, ["input_ids"])})


def rm(spec):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    rows = load_jsonl(f"{spec['data_dir']}/pref.jsonl", n)
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                             "length": max(r["chosen_length"], r["rejected_length"])} for r in rows])
    tok = _tokenizer(spec)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(**_common_args(spec, out), max_length=spec["max_len"],
                            center_rewards_coefficient=None)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        return _run(spec, trainer, {"dataset_tokens": _column_tokens(trainer.train_dataset,
                                                                     ["chosen_ids", "rejected_ids"])})


def dpo(spec):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    rows = load_jsonl(f"{spec['data_dir']}/pref.jsonl", n)
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                             "length": r["chosen_length"] + r["rejected_length"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**_common_args(spec, out), max_length=spec["max_len"], beta=0.1,
                         loss_type=["sigmoid"], precompute_ref_log_probs=True,
                         precompute_ref_batch_size=spec["batch"])
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds,
                             processing_class=_tokenizer(spec))
        init_s = time.perf_counter() - t0
        d = trainer.train_dataset
        tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                     zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"]))
        return _run(spec, trainer, {"dataset_tokens": tokens, "ref_precompute_s": init_s})


def sample(spec):
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(spec)
    tok.padding_side = "left"
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).eval()
    prompts = [r["prompt"] for r in load_jsonl(f"{spec['data_dir']}/prompts.jsonl")]
    b = spec["batch"]
    times, tokens = [], []
    for rep in range(spec["warmup"] + spec["steps"]):
        batch = tok([prompts[(rep * b + i) % len(prompts)] for i in range(b)], return_tensors="pt",
                    padding=True)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=spec["new_tokens"], eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        times.append(time.perf_counter() - t)
        tokens.append(_tokens_through_eos(out[:, batch["input_ids"].shape[1]:], tok.eos_token_id))
    return sampling_result(spec, times, tokens)


def _tokens_through_eos(responses: torch.Tensor, eos: int) -> int:
    """Response tokens up to and including the first EOS of each row (what alignkit counts)."""
    is_eos = (responses == eos).long()
    return int(((is_eos.cumsum(-1) - is_eos) == 0).sum())


# ------------------------------------------------------------------------------ RL iterations


def _group_rl(spec, trainer_cls, config_cls, extra_args):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    k, p = spec["k"], spec["prompts_per_iter"]
    n = p * (spec["warmup"] + spec["steps"])
    rows = load_jsonl(f"{spec['data_dir']}/prompts.jsonl", n)
    ds = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    gen_tokens: list[int] = []

    def reward(prompts, completions, completion_ids, **kw):
        gen_tokens.append(sum(len(c) for c in completion_ids))
        return [reward_of_ids(c) for c in completion_ids]

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    spec_b = dict(spec, batch=p * k)
    with tempfile.TemporaryDirectory() as out:
        args = config_cls(**_common_args(spec_b, out, group_by_length=False),
                          num_generations=k, max_completion_length=spec["new_tokens"],
                          steps_per_generation=1, num_iterations=1, temperature=1.0, top_p=1.0,
                          top_k=0, log_completions=False, **extra_args)
        trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=_tokenizer(spec))
        clock = StepClock()
        trainer.add_callback(_clock_callback(clock, None))
        trainer.train()
    return rl_result(spec, clock, gen_tokens, p * k)


def _vllm_args(spec) -> dict:
    """TRL's own vLLM rollouts for the *_vllm cases: ``use_vllm=True``, ``vllm_mode="colocate"``
    (an engine in the trainer's process, weights pushed after each step), as alignkit's cells
    run theirs. On CPUs vLLM's KV cache is sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB), not by
    ``vllm_gpu_memory_utilization``: 1 GiB, as alignkit's ``sampling.vllm_kv_cache_gib``."""
    if spec.get("engine") != "vllm":
        return {}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return dict(use_vllm=True, vllm_mode="colocate")


def grpo(spec):
    from trl import GRPOConfig, GRPOTrainer

    # DeepSeekMath GRPO: group-normalised advantages, k3 KL to the reference (beta 0.04),
    # clip 0.2, per-sequence token mean ("grpo" aggregation), one update per rollout.
    return _group_rl(spec, GRPOTrainer, GRPOConfig,
                     dict(beta=0.04, epsilon=0.2, loss_type="grpo", scale_rewards="group",
                          **_vllm_args(spec)))


def rloo(spec):
    from trl import RLOOConfig, RLOOTrainer

    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, sequence KL penalty in the reward
    # (beta 0.05, TRL's default), clip 0.2, one update per rollout.
    return _group_rl(spec, RLOOTrainer, RLOOConfig, dict(beta=0.05, epsilon=0.2, **_vllm_args(spec)))


def ppo(spec):
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_module
    except ImportError as e:
        raise Skip(f"this TRL has no PPOTrainer ({e}); run with the bench/.venv-trl-ppo venv") from None
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    p = spec["prompts_per_iter"]
    tok = _tokenizer(spec)
    tok.padding_side = "left"  # generation batches are left-padded
    n = p * (spec["warmup"] + spec["steps"])
    rows = load_jsonl(f"{spec['data_dir']}/prompts.jsonl", n)
    ds = Dataset.from_list([{"input_ids": tok(r["prompt"])["input_ids"]} for r in rows])

    def load(cls, **kw):
        m = cls.from_pretrained(spec["model_dir"], dtype=torch.float32, **kw)
        m.config.pad_token_id = tok.pad_token_id
        return m

    policy, ref = load(AutoModelForCausalLM), load(AutoModelForCausalLM)
    value = load(AutoModelForSequenceClassification, num_labels=1)
    reward = load(AutoModelForSequenceClassification, num_labels=1)

    gen_tokens: list[int] = []
    original = ppo_module.batch_generation

    def counting_generation(model, queries, *a, **kw):
        query_responses, logits = original(model, queries, *a, **kw)
        gen_tokens.append(_tokens_through_eos(query_responses[:, queries.shape[1]:], tok.eos_token_id))
        return query_responses, logits

    ppo_module.batch_generation = counting_generation
    micro = spec.get("micro_batch", p)
    common = _common_args(dict(spec, batch=micro), "", group_by_length=False)
    common.pop("max_steps")
    # local batch = micro x accumulation x 1 mini-batch = p prompts per rollout, as on our side
    common["gradient_accumulation_steps"] = p // micro
    with tempfile.TemporaryDirectory() as out:
        common["output_dir"] = out
        args = PPOConfig(**common, total_episodes=n, num_ppo_epochs=spec.get("ppo_epochs", 1),
                         num_mini_batches=1, response_length=spec["new_tokens"], temperature=1.0,
                         stop_token="eos", kl_coef=0.05, local_rollout_forward_batch_size=p,
                         num_sample_generations=0, missing_eos_penalty=None)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=ds)
        clock = StepClock()
        trainer.add_callback(_clock_callback(clock, None))
        trainer.train()
    return rl_result(spec, clock, gen_tokens, p)


CASES = {"sft": sft, "rm": rm, "dpo": dpo, "sample": sample, "grpo": grpo, "rloo": rloo, "ppo": ppo,
         # both sides' rollouts on vLLM (the spec's engine="vllm"; the peer venv .venv-trl-vllm)
         "grpo_vllm": grpo, "rloo_vllm": rloo}
