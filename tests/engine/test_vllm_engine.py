"""The vLLM sampling backend (engine/vllm_engine.py) against the hf backend and the trainer.

One in-process engine for the module (vLLM runs one at a time here; starting one takes ~5 s,
``import vllm`` ~10 s). The models are tiny random Llamas with a head size of 32 (vLLM's CPU
attention has no kernel below 32). fp32 throughout: vLLM's kernels and torch's agree to ~1e-6
on these models, so the parity tolerance is 1e-4 (as the issue asks).
"""

import os

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.engine.generation import generate, rollout_logps
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.workers import weights_version

try:
    import alignkit.engine.vllm_engine as ve
    ve.import_vllm()
    import vllm  # noqa: F401
except ConfigError as exc:  # pragma: no cover - only where vllm is not installed
    pytest.skip(f"vllm is not importable here: {exc.__cause__}", allow_module_level=True)

pytestmark = pytest.mark.slow   # import vllm (~10 s) and one engine start (~5 s)
TOL = 1e-4
EOS, PAD = 2, 0


def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)).eval()


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 10, 11, 12, 13, 14], [1, 20, 21]]


def trainer_prompt_logps(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def policy():
    # Flask (imported by `alignkit serve` and the annotation app) holds proxies whose attribute
    # lookups raise outside an app context; vLLM's start-up probes every module global, and the
    # engine must start all the same (_unprobeable_globals_hidden).
    import flask  # noqa: F401

    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0)
    set_num_threads = torch.set_num_threads
    model = tiny_llama()
    engine = ve.engine_for(model, kv_cache_gib=0.25)
    # vLLM's CPU worker swaps torch.set_num_threads for a no-op; the engine puts it back and
    # leaves the trainer's threads and CPU affinity as they were.
    assert torch.set_num_threads is set_num_threads
    assert torch.get_num_threads() == threads
    assert os.sched_getaffinity(0) == affinity
    yield model, engine
    ve.shutdown()
    assert not torch.distributed.is_initialized()   # vLLM's one-rank group went with it


def draw(model, prompts, seeds, **kw):
    cfg = SamplingConfig(engine="vllm", vllm_kv_cache_gib=0.25, **kw)
    return ve.sample_vllm(model, prompts, cfg, eos_token_id=EOS, pad_token_id=PAD, seeds=seeds)


def test_engine_leaves_the_trainers_threads_settable(policy):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(n)


def test_sync_makes_engine_logps_equal_the_trainers(policy):
    model, engine = policy
    seq = [1, 5, 6, 7, 8, 9, 30, 31, 32, 40]
    assert (engine.prompt_logps(seq) - trainer_prompt_logps(model, seq)).abs().max() <= TOL
    with torch.no_grad():                      # an update the engine has not seen
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert (engine.prompt_logps(seq) - trainer_prompt_logps(model, seq)).abs().max() > 0.05
    assert engine.sync(model) is True
    assert engine.sync(model) is False          # nothing changed since
    assert (engine.prompt_logps(seq) - trainer_prompt_logps(model, seq)).abs().max() <= TOL


def test_an_optimizer_step_is_synced_before_the_next_draw(policy):
    model, engine = policy
    seq = [1, 5, 6, 7, 8, 9]
    draw(model, [seq], [0], max_new_tokens=2)   # synced now
    # fused, as the training loop steps: it writes the parameters without bumping their versions
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.tensor([seq]), labels=torch.tensor([seq])).loss.backward()
    opt.step()
    opt.zero_grad()
    assert engine.version != weights_version(model)
    before = engine.prompt_logps(seq)
    assert (before - trainer_prompt_logps(model, seq)).abs().max() > 1e-3
    draw(model, [seq], [0], max_new_tokens=2)   # the backend syncs first
    assert engine.version == weights_version(model)
    assert (engine.prompt_logps(seq) - trainer_prompt_logps(model, seq)).abs().max() <= TOL


def test_lora_policy_is_synced_merged(policy):
    """roles=shared: PEFT's layers inside the causal LM; the engine gets W + BA under HF names."""
    from peft import LoraConfig, get_peft_model

    model, engine = policy
    lora = get_peft_model(tiny_llama(seed=0), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        lora.base_model.model.load_state_dict(model.state_dict(), strict=False)
        for name, p in lora.named_parameters():
            if "lora_B" in name:                # B = 0 at init: make the adapter count
                p.normal_(0, 0.3)
    inner = lora.base_model.model               # what roles=shared hands to sample()
    names = [n for n, _ in ve.hf_weights(inner)]
    assert names == [n for n, _ in ve.hf_weights(lora)]
    assert set(names) == set(model.state_dict())  # plain HF names, no lora_/base_layer
    seq = [1, 5, 6, 7, 8, 9, 30, 31]
    base = trainer_prompt_logps(model, seq)
    adapted = trainer_prompt_logps(inner, seq)
    assert (adapted - base).abs().max() > 0.05
    engine.sync(inner)
    assert (engine.prompt_logps(seq) - adapted).abs().max() <= TOL
    with inner.disable_adapter() if hasattr(inner, "disable_adapter") else lora.disable_adapter():
        engine.sync(model)                      # back to the base model's weights
    assert (engine.prompt_logps(seq) - base).abs().max() <= TOL


def test_greedy_contract_matches_hf(policy):
    model, _ = policy
    # Weights under which greedy decoding of PROMPTS ends rows 0 and 2 with EOS (after 1 and 9
    # tokens) and never rows 1 and 3; loaded in place, so the backend syncs them itself.
    model.load_state_dict(tiny_llama(seed=1).state_dict())
    eos = EOS
    hf = generate(model, PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=12),
                  eos_token_id=eos, pad_token_id=PAD)
    assert hf.finished.tolist() == [True, False, True, False]
    cfg = SamplingConfig(engine="vllm", temperature=0.0, max_new_tokens=12, vllm_kv_cache_gib=0.25)
    got = ve.sample_vllm(model, PROMPTS, cfg, eos_token_id=eos, pad_token_id=PAD, seeds=[1, 2, 3, 4])
    assert torch.equal(got.prompt_ids, hf.prompt_ids) and torch.equal(got.prompt_mask, hf.prompt_mask)
    assert got.response_ids.shape == hf.response_ids.shape
    assert torch.equal(got.response_ids, hf.response_ids)
    assert torch.equal(got.response_mask, hf.response_mask)
    assert torch.equal(got.finished, hf.finished) and bool(got.finished[0])
    assert not bool(got.finished.all())
    n = int(got.response_mask[0].sum())
    assert int(got.response_ids[0, n - 1]) == eos and bool((got.response_ids[0, n:] == PAD).all())
    assert (got.logps - hf.logps).abs().max() <= TOL
    assert (got.logps - rollout_logps(model, got, 1.0).detach()).abs().max() <= TOL


def test_sampled_logps_equal_the_trainers(policy):
    model, _ = policy
    got = draw(model, PROMPTS * 2, list(range(8)), temperature=0.7, max_new_tokens=10)
    assert got.response_ids.shape[0] == 8 and got.logps.dtype == torch.float32
    assert torch.equal(got.logps == 0, got.response_mask == 0)
    trainer = rollout_logps(model, got, 0.7).detach()
    assert (got.logps - trainer).abs().max() <= TOL


def test_top_k_logps_are_of_the_filtered_distribution(policy):
    """vLLM's processed log-probs: under softmax(top_k(logits / T)), what the token was drawn from."""
    from alignkit.engine.generation import filter_logits

    model, _ = policy
    got = draw(model, PROMPTS, [5, 6, 7, 8], temperature=1.0, top_k=3, max_new_tokens=6)
    ids, mask = got.sequences()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits.float()
    p = got.prompt_ids.size(1)
    logits = logits[:, p - 1:-1]
    filtered = torch.log_softmax(filter_logits(logits, top_k=3), -1)
    expected = filtered.gather(-1, got.response_ids[..., None]).squeeze(-1).masked_fill(
        got.response_mask == 0, 0.0)    # padding's token may be outside the top-k (-inf)
    assert (got.logps - expected).abs().max() <= TOL
    unfiltered = rollout_logps(model, got, 1.0).detach()
    assert bool(((got.logps - unfiltered) * got.response_mask >= -TOL).all())


def test_draws_are_reproducible_per_row_seed(policy):
    model, _ = policy
    a = draw(model, PROMPTS, [11, 12, 13, 14], max_new_tokens=12)
    b = draw(model, PROMPTS, [11, 12, 13, 14], max_new_tokens=12)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logps, b.logps)
    c = draw(model, PROMPTS, [21, 22, 23, 24], max_new_tokens=12)
    assert not torch.equal(a.response_ids, c.response_ids)
    # A row's draw depends on its prompt and seed only, not on the rows beside it; seeds may be
    # as large as row_seeds makes them.
    alone = draw(model, [PROMPTS[2]], [13], max_new_tokens=12)
    n = int(alone.response_mask.sum())
    assert alone.response_ids[0, :n].tolist() == a.response_ids[2, :n].tolist()
    big = draw(model, PROMPTS[:2], [2**63 - 1, 2**62], max_new_tokens=4)
    assert big.response_ids.shape[0] == 2


def test_vllm_not_importable_names_the_setting(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"sampling\.engine=vllm: vLLM cannot be imported.*"
                                          r"pip install alignkit\[vllm\]"):
        ve.import_vllm()


def test_architecture_vllm_lacks_names_the_setting(policy):
    model, engine = policy

    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"architectures": ["NoSuchLMForCausalLM"]})()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ConfigError, match=r"sampling\.engine=vllm: vLLM .* no model class for "
                                          r"architecture 'NoSuchLMForCausalLM'"):
        ve.engine_for(Unknown(), kv_cache_gib=0.25)
    assert ve.engine_for(model, kv_cache_gib=0.25) is engine   # the running engine is untouched


def test_an_engine_that_cannot_start_names_the_setting_and_the_next_one_starts(policy):
    """Last in the module: it stops the module's engine. A head size vLLM's CPU attention has no
    kernel for (8, as conftest's tiny models), then a KV cache too small for one sequence of the
    model's context, then the module's model again (a clean start after failed ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = policy
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=128))
    with pytest.raises(ConfigError, match=r"sampling\.engine=vllm: vLLM could not start for "
                                          r"LlamaForCausalLM \(.*head_dim=8"):
        ve.engine_for(narrow, kv_cache_gib=0.25)
    # 128 positions x 2 layers x (K + V) x 64 x 4 bytes = 128 KiB > 2**-14 GiB = 64 KiB
    with pytest.raises(ConfigError, match=r"sampling\.engine=vllm: vLLM could not start .*"
                                          r"raise sampling\.vllm_kv_cache_gib"):
        ve.engine_for(tiny_llama(seed=4), kv_cache_gib=2**-14)
    engine = ve.engine_for(model, kv_cache_gib=0.25)
    seq = [1, 5, 6, 7, 8, 9]
    assert (engine.prompt_logps(seq) - trainer_prompt_logps(model, seq)).abs().max() <= TOL


def test_globals_that_cannot_be_probed_are_hidden_only_while_the_engine_starts():
    import sys
    import types

    class Unbound:
        def __getattribute__(self, name):
            raise RuntimeError("working outside of a context")

    module = types.ModuleType("alignkit_test_unprobeable")
    module.proxy, module.plain = Unbound(), 3
    sys.modules[module.__name__] = module
    try:
        proxy = module.__dict__["proxy"]
        with ve._unprobeable_globals_hidden():
            assert module.__dict__["proxy"] is None and module.plain == 3
            for value in vars(module).values():
                hasattr(value, "__dict__")          # what vLLM's kernel scan does: no error
        assert module.__dict__["proxy"] is proxy and module.plain == 3
    finally:
        del sys.modules[module.__name__]
