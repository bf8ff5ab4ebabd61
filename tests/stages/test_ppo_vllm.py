"""GRPO / RLOO iterations sampled by vLLM (rollout.sampling.engine=vllm): the engine is synced
with every update (the trainer's recomputed log-probs equal the engine's each iteration, fp32),
the gap is logged, truncated importance sampling runs, and a LoRA policy (roles=shared) syncs."""

import json

import pytest
import torch

from alignkit.config import ConfigError, load_config
from alignkit.stages import ppo
from alignkit.tracking import read_metrics

try:
    import alignkit.engine.vllm_engine as ve
    ve.import_vllm()
except ConfigError as exc:  # pragma: no cover - only where vllm is not installed
    pytest.skip(f"vllm is not importable here: {exc.__cause__}", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def count_e(prompts, responses):
    return [float(r.count("e")) for r in responses]


@pytest.fixture(scope="module")
def wide_base(tiny_base, tmp_path_factory):
    """tiny_base's tokenizer on a Llama whose heads are 32 wide (vLLM's CPU attention has no
    kernel for tiny_base's 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.engine.models import load_tokenizer

    tok = load_tokenizer(tiny_base)
    out = tmp_path_factory.mktemp("wide_base") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Review {i}: the film"}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("algo,roles", [("grpo", "separate"), ("rloo", "shared")])
def test_iterations_on_vllm_keep_engine_and_trainer_in_step(wide_base, prompt_file, tmp_path,
                                                             algo, roles):
    cfg = load_config(ppo.Config, None, [
        f"model={wide_base}", f"reward=python:{__name__}:count_e", f"out_dir={tmp_path}",
        f"rollout.prompts={prompt_file}", "rollout.prompts_per_iteration=4",
        "rollout.samples_per_prompt=2", "rollout.sampling.max_new_tokens=6",
        "rollout.sampling.engine=vllm", "rollout.sampling.vllm_kv_cache_gib=0.25",
        f"ppo.algo={algo}", f"roles={roles}", "ppo.epochs=1", "ppo.minibatch_size=8",
        "ppo.micro_batch_size=8", "ppo.tis_cap=2.0", "iterations=3", "report_to=none",
        "optim.lr=5e-2", "kl.beta=0.01", "eval.num_prompts=0", "lora.r=4", "lora.alpha=8"])
    ppo.main(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 3
    for row in rows:
        # Synced after every update: without the sync, iterations 2 and 3 would sample from the
        # first policy and the trainer's log-probs (lr 5e-2) would be far from the engine's.
        assert row["logprob_gap_max"] < 1e-4, row
        assert 0 <= row["logprob_gap_mean"] <= row["logprob_gap_max"]
    assert rows[0]["grad_norm"] > 0


def test_reusing_engine_logps_is_refused():
    from alignkit.engine.rl.rollout import RolloutConfig
    from alignkit.engine.sampling import SamplingConfig

    with pytest.raises(ConfigError, match="rollout.reuse_sampling_logps needs rollout.sampling.engine=hf"):
        RolloutConfig(reuse_sampling_logps=True, sampling=SamplingConfig(engine="vllm"))
