"""Role placement: shared mode serves reference, policy, value and reward from one base through
adapters (and matches the separate models it replaces); parameter counts of both placements."""

import json

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.engine.generation import generate, rollout_logps
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.models import LoraSpec, load_causal_lm, load_tokenizer
from alignkit.engine.rl.roles import (POLICY, REWARD, VALUE, RoleSpec, backbone, build_roles, memory_report,
                            params_in_memory, token_values)

LORA = LoraSpec(r=4, alpha=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_rm(tiny_base, tmp_path_factory):
    """A reward model trained as a LoRA adapter on the tiny base by the rm stage itself, saved
    both merged (``model/``) and as an adapter (``adapter/``)."""
    from alignkit.data.sources import DataConfig
    from alignkit.stages import reward
    from alignkit.engine.training import LoopConfig, OptimConfig

    out = tmp_path_factory.mktemp("rm")
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Review {i}:", "chosen": " a great film",
                                        "rejected": " a dull mess"}) + "\n" for i in range(16)))
    cfg = reward.Config(model=str(tiny_base), out_dir=str(out), data=DataConfig(train=str(data)),
                        lora=LoraSpec(enabled=True, r=4, alpha=8), save_adapter=True,
                        optim=OptimConfig(lr=3e-2),
                        train=LoopConfig(max_steps=3, batch_size=8, micro_batch_size=8,
                                         mixed_precision="no", log_every=100))
    reward.main(cfg)
    assert (out / "adapter" / "adapter_config.json").exists()
    return out


def _spec(tiny_base, reward="python:builtins:len", **kw):
    return RoleSpec(model=str(tiny_base), reference=None, reward=reward, lora=LORA, **kw)


def _rollout(tiny_base, model, n=6, seed=0):
    tok = load_tokenizer(tiny_base)
    prompts = [tok(f"The movie number {i} was")["input_ids"][: 2 + i % 4] for i in range(n)]
    return generate(model, prompts, SamplingConfig(max_new_tokens=6), eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def test_shared_reference_is_the_base_with_adapters_disabled(tiny_base):
    tok = load_tokenizer(tiny_base)
    roles = build_roles("shared", _spec(tiny_base), tok, needs_value=True)
    base = load_causal_lm(tiny_base, tokenizer=tok).eval()
    roles.train(False)
    _perturb(roles.policy_parameters(), 1)   # LoRA B starts at 0: make the adapter matter
    r = _rollout(tiny_base, roles.policy)
    base_logps = rollout_logps(base, r)
    with torch.no_grad():
        ref = rollout_logps(roles.reference, r)
        policy = rollout_logps(roles.policy, r)
    torch.testing.assert_close(ref, base_logps, rtol=0, atol=1e-6)
    assert (policy - base_logps).abs().max() > 1e-2          # the policy adapter is active
    assert roles.peft.active_adapter == POLICY                 # and stays so after the reference


def test_policy_and_value_adapters_are_distinct(tiny_base):
    tok = load_tokenizer(tiny_base)
    roles = build_roles("shared", _spec(tiny_base), tok, needs_value=True)
    roles.train(False)
    policy_ids = {id(p) for p in roles.policy_parameters()}
    value_ids = {id(p) for p in roles.value_parameters()}
    assert policy_ids and value_ids and not policy_ids & value_ids
    r = _rollout(tiny_base, roles.policy)
    with torch.no_grad():
        logps0, values0 = rollout_logps(roles.policy, r), roles.values(r)
        _perturb(roles.adapter_parameters(VALUE), 2)           # value adapter only
        logps1, values1 = rollout_logps(roles.policy, r), roles.values(r)
        _perturb(roles.policy_parameters(), 3)                 # policy adapter only
        logps2, values2 = rollout_logps(roles.policy, r), roles.values(r)
    torch.testing.assert_close(logps1, logps0, rtol=0, atol=0)
    assert (values1 - values0).abs().max() > 1e-3
    assert (logps2 - logps1).abs().max() > 1e-2
    torch.testing.assert_close(values2, values1, rtol=0, atol=0)
    # Values come from the value adapter's backbone + head, per response token, 0 on padding.
    with roles._active(VALUE), torch.no_grad():
        direct = token_values(backbone(roles.policy), roles.value_head, r)
    torch.testing.assert_close(values2, direct, rtol=0, atol=0)
    assert (values2[r.response_mask == 0] == 0).all()
    # Both adapters train: gradients of a value loss reach only the value parameters.
    roles.values(r).sum().backward()
    assert all(p.grad is not None for p in roles.value_parameters())
    assert all(p.grad is None for p in roles.policy_parameters())


def test_shared_reward_adapter_scores_like_the_merged_reward_model(tiny_base, tiny_rm):
    from alignkit.engine.scoring import make_reward_source

    tok = load_tokenizer(tiny_base)
    roles = build_roles("shared", _spec(tiny_base, f"model:{tiny_rm / 'adapter'}"), tok,
                        needs_value=True)
    merged = make_reward_source(f"model:{tiny_rm / 'model'}")
    prompts = ["Review 1:", "Review 2:", "A long review of the film:", "x"]
    responses = [" a great film", " a dull mess", " it was fine, I guess", ""]
    shared_scores, merged_scores = roles.reward(prompts, responses), merged(prompts, responses)
    assert merged_scores[0] - merged_scores[1] > 0.05           # the adapter learnt something
    assert shared_scores == pytest.approx(merged_scores, abs=1e-5)
    assert roles.peft.active_adapter == POLICY
    assert all(not p.requires_grad for p in roles.adapter_parameters(REWARD))


def test_value_initialised_from_the_reward_model(tiny_base, tiny_rm):
    tok = load_tokenizer(tiny_base)
    shared = build_roles("shared", _spec(tiny_base, f"model:{tiny_rm / 'adapter'}",
                                         value_init="reward"), tok, needs_value=True)
    for v, r in zip(shared.adapter_parameters(VALUE), shared.adapter_parameters(REWARD)):
        assert v is not r and torch.equal(v, r)
    assert torch.equal(shared.value_head.weight, shared.reward_head.weight)
    separate = build_roles("separate", _spec(tiny_base, f"model:{tiny_rm / 'model'}",
                                             value_init="reward"), tok, needs_value=True)
    assert torch.equal(separate.value.score.weight, separate.reward.model.score.weight)
    assert separate.value.score.weight is not separate.reward.model.score.weight


def test_parameter_counts_one_base_plus_adapters_vs_four_models(tiny_base, tiny_rm):
    tok = load_tokenizer(tiny_base)
    shared = build_roles("shared", _spec(tiny_base, f"model:{tiny_rm / 'adapter'}"), tok, True)
    separate = build_roles("separate", _spec(tiny_base, f"model:{tiny_rm / 'model'}"), tok, True)
    one = params_in_memory([load_causal_lm(tiny_base, tokenizer=tok)])
    adapters = sum(p.numel() for n in (POLICY, VALUE, REWARD) for p in shared.adapter_parameters(n))
    heads = shared.value_head.weight.numel() + shared.reward_head.weight.numel()
    s, d = memory_report(shared), memory_report(separate)
    assert s["params_one_model"] == d["params_one_model"] == one
    assert s["params_in_memory"] == one + adapters + heads      # exactly one base
    assert s["params_ratio_vs_one_model"] < 1.5   # rank-4 adapters are large on a 32-wide model
    assert s["params_ratio_without_adapters"] == pytest.approx((one + heads) / one)   # ~1.0
    # policy + reference + value + reward: four bodies (the scalar models swap the tied LM head
    # for a 1-output score head, so each is one model plus hidden_size weights).
    assert d["params_in_memory"] == 4 * one + 2 * shared.value_head.weight.numel()
    assert d["params_ratio_vs_one_model"] == pytest.approx(4.0, abs=0.01)
    assert d["params_ratio_without_adapters"] == d["params_ratio_vs_one_model"]   # no adapters
    assert s["params_trainable"] == adapters - sum(p.numel() for p in shared.adapter_parameters(REWARD)) \
        + shared.value_head.weight.numel()


def test_placement_errors_name_the_fix(tiny_base, tiny_rm):
    tok = load_tokenizer(tiny_base)
    with pytest.raises(ConfigError, match="adapter folder"):
        build_roles("shared", _spec(tiny_base, f"model:{tiny_rm / 'model'}"), tok, True)
    with pytest.raises(ConfigError, match="roles=shared an adapter"):
        build_roles("separate", _spec(tiny_base, f"model:{tiny_rm / 'adapter'}"), tok, True)
    with pytest.raises(ConfigError, match="reference"):
        build_roles("shared", RoleSpec(model=str(tiny_base), reference="/elsewhere",
                                       reward="python:builtins:len"), tok, True)
    with pytest.raises(ConfigError, match="unknown roles placement"):
        build_roles("cloud", _spec(tiny_base), tok, True)
