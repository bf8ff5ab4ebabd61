"""The PPO / RLOO / GRPO stage: accumulation invariance of loss and gradient, resumed ==
uninterrupted, end-to-end runs that raise a Python reward, prompt schedule, report figure."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.engine.rl.algorithms import ALGORITHMS, PPOConfig
from alignkit.config import ConfigError, load_config
from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.models import load_causal_lm, load_tokenizer
from alignkit.engine.rl.roles import RoleSpec, build_roles
from alignkit.engine.rl.rollout import collect, iteration_prompts, rollout_packing
from alignkit.engine.rl.update import accumulate
from alignkit.stages import ppo
from alignkit.tracking import read_metrics
from alignkit.engine.training import make_accelerator

INTERRUPT = {"at_call": None, "calls": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def count_e(prompts, responses):
    """Reward: how many letters "e" the response holds."""
    return [float(r.count("e")) for r in responses]


def count_e_interruptible(prompts, responses):
    INTERRUPT["calls"] += 1
    if INTERRUPT["calls"] == INTERRUPT["at_call"]:
        raise KeyboardInterrupt
    return count_e(prompts, responses)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Review {i}: the film" + " was" * (i % 3)}) + "\n"
                            for i in range(24)))
    return path


def config(tiny_base, prompt_file, out_dir, reward="count_e", **overrides):
    base = [f"model={tiny_base}", f"reward=python:{__name__}:{reward}", f"out_dir={out_dir}",
            f"rollout.prompts={prompt_file}", "rollout.prompts_per_iteration=8",
            "rollout.sampling.max_new_tokens=8", "rollout.batch_size=8", "ppo.epochs=2",
            "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "iterations=6", "report_to=none",
            "optim.lr=3e-2", "optim.schedule=constant", "value_optim.lr=3e-3", "kl.beta=0.01",
            "lora.r=8", "lora.alpha=16"]
    return load_config(ppo.Config, None, base + [f"{k}={v}" for k, v in overrides.items()])


# ----------------------------------------------------------------------------- accumulation


def _experience(tiny_base, algo):
    tok = load_tokenizer(tiny_base)
    cfg = load_config(ppo.Config, None, [
        f"model={tiny_base}", f"reward=python:{__name__}:count_e", "rollout.prompts=unused",
        "rollout.prompts_per_iteration=4", "rollout.samples_per_prompt=2", f"ppo.algo={algo}",
        "ppo.minibatch_size=8", "kl.beta=0.1"])
    a = ALGORITHMS[algo]
    roles = build_roles("separate", RoleSpec(model=str(tiny_base), reference=None, reward=cfg.reward),
                        tok, needs_value=a.uses_value)
    texts = [f"Review {i}: the film" + " was" * i for i in range(4) for _ in range(2)]
    s = collect(roles, [tok(t)["input_ids"] for t in texts], texts, tok,
                SamplingConfig(max_new_tokens=8), torch.Generator().manual_seed(0), batch_size=8)
    exp = s.experience
    exp.advantages, exp.returns = a.advantages(exp, s.proxy, 0.1, cfg.ppo, cfg.kl.estimator,
                                                cfg.rollout.samples_per_prompt)
    with torch.no_grad():  # a policy that moved since the rollout: ratios != 1, some clipped
        for p in roles.policy_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return roles, exp, a, cfg


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_batch_of_8_equals_2_accumulated_micro_batches_of_4(tiny_base, algo):
    torch.manual_seed(0)
    roles, exp, a, _ = _experience(tiny_base, algo)
    accelerator = make_accelerator("no")
    params = roles.policy_parameters() + (roles.value_parameters() if a.uses_value else [])
    results = []
    for micro in (8, 4):
        for p in params:
            p.grad = None
        ppo_cfg = PPOConfig(algo=algo, minibatch_size=8, micro_batch_size=micro)
        stats = accumulate(roles, exp, a, ppo_cfg, 0.1, 1.0, accelerator, ppo_cfg.packing)
        results.append((stats, [p.grad.clone() for p in params]))
    (one, g1), (two, g2) = results
    assert one["clipfrac"] > 0                                 # the clip is exercised
    for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert max(float((x - y).abs().max()) for x, y in zip(g1, g2)) < 1e-6
    assert max(float(x.abs().max()) for x in g1) > 1e-4       # and the gradient is not zero


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_packed_minibatch_equals_the_padded_one(tiny_base, algo):
    """ppo.packing: the rows' real tokens in one flat row, and with each prompt written once for
    its rows (the two samples of a prompt, here apart in a shuffled minibatch), give the padded
    batch's losses, metrics and gradients (policy and value), and the old/reference log-probs and
    values of collect."""
    torch.manual_seed(0)
    roles, exp, a, _ = _experience(tiny_base, algo)
    models = roles.rollout_models()
    assert rollout_packing(models, True) == "shared" and not rollout_packing(models, False)
    exp = exp.take([0, 2, 1, 4, 3, 6, 5, 7])   # each micro-batch of 4 holds a prompt's 2 rows apart
    assert exp.take([0, 1, 2, 3]).rollout.packed_shared.shared_prefix_lens.count(0) == 3
    mask = exp.rollout.sequences()[1]
    assert mask.sum() < mask.numel()                          # the rows have padding to skip
    accelerator = make_accelerator("no")
    params = roles.policy_parameters() + (roles.value_parameters() if a.uses_value else [])
    results = []
    for packing in (False, True, "shared"):
        for p in params:
            p.grad = None
        ppo_cfg = PPOConfig(algo=algo, minibatch_size=8, micro_batch_size=4, packing=packing)
        stats = accumulate(roles, exp, a, ppo_cfg, 0.1, 1.0, accelerator, ppo_cfg.packing)
        results.append((stats, [p.grad.clone() for p in params]))
    (padded, g1), *packed_runs = results
    for packed, g2 in packed_runs:
        for key in ("policy_loss", "value_loss", "clipfrac", "approx_kl"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-5), key
        assert max(float((x - y).abs().max()) for x, y in zip(g1, g2)) < 1e-5
    assert max(float(x.abs().max()) for x in g1) > 1e-4

    from alignkit.engine.generation import rollout_logps

    with torch.no_grad():
        for pack in (True, "shared"):
            for model in (roles.policy, roles.reference):
                torch.testing.assert_close(rollout_logps(model, exp.rollout, 1.0, pack),
                                           rollout_logps(model, exp.rollout, 1.0), rtol=0, atol=1e-5)
            if a.uses_value:
                torch.testing.assert_close(roles.values(exp.rollout, pack), roles.values(exp.rollout),
                                           rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- resume


def test_resumed_run_equals_uninterrupted(tiny_base, prompt_file, tmp_path):
    kw = dict(reward="count_e_interruptible", iterations=3, save_every=1,
              **{"kl.adaptive": "true", "kl.target": 0.5, "kl.horizon": 100,
                 "score.normalize": "standardize", "rollout.samples_per_prompt": 2})
    INTERRUPT.update(at_call=None, calls=0)
    ppo.main(config(tiny_base, prompt_file, tmp_path / "straight", **kw))
    INTERRUPT.update(at_call=3, calls=0)                        # during iteration 3
    with pytest.raises(KeyboardInterrupt):
        ppo.main(config(tiny_base, prompt_file, tmp_path / "resumed", **kw))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2]
    INTERRUPT.update(at_call=None)
    ppo.main(config(tiny_base, prompt_file, tmp_path / "resumed", **kw))

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    timing = {"tokens_per_s", "iteration_s"}
    for a, b in zip(straight, resumed):
        for key in set(a) - timing:
            assert b[key] == pytest.approx(a[key], abs=1e-6, nan_ok=True), (a["step"], key)
    assert len({r["beta"] for r in straight}) > 1               # the controller state mattered
    wa = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_reusing_the_sampled_logps_skips_a_forward_and_changes_nothing(tiny_base, prompt_file,
                                                                      tmp_path, algo, monkeypatch):
    from alignkit.engine.rl import rollout

    calls = []
    real = rollout.rollout_logps
    monkeypatch.setattr(rollout, "rollout_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {"ppo.algo": algo, "rollout.samples_per_prompt": 4, "rollout.prompts_per_iteration": 2,
          "iterations": 2, "optim.lr": 1e-3}   # Adam amplifies float error at a large lr
    ppo.main(config(tiny_base, prompt_file, tmp_path / "forward", **kw))
    per_iteration = len(calls) // 2                             # policy + reference
    calls.clear()
    ppo.main(config(tiny_base, prompt_file, tmp_path / "reused",
                    **kw, **{"rollout.reuse_sampling_logps": "true"}))
    assert (per_iteration, len(calls) // 2) == (2, 1)          # the reference forward only
    a, b = read_metrics(tmp_path / "forward"), read_metrics(tmp_path / "reused")
    for ra, rb in zip(a, b):
        assert rb["logprob_gap_max"] < 1e-5                     # measured on the training forward
        for key in ("proxy_reward_mean", "kl_to_ref", "entropy", "policy_loss", "approx_kl"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-4), key   # float error only
    wa = load_file(tmp_path / "forward" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "reused" / "model" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4


# ----------------------------------------------------------------------------- end to end


def _mean_reward(model_path, tok, prompt_file, n=48):
    from alignkit.engine.sampling import sample_texts

    texts = [json.loads(line)["prompt"] for line in prompt_file.read_text().splitlines()]
    model = load_causal_lm(model_path, tokenizer=tok).eval()
    prompts = [texts[i % len(texts)] for i in range(n)]
    _, responses = sample_texts(model, tok, prompts, SamplingConfig(max_new_tokens=8), chat=False,
                                seed=123)
    return sum(count_e(prompts, responses)) / n


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_a_few_iterations_raise_a_python_reward(tiny_base, prompt_file, tmp_path, algo):
    k = 1 if algo == "ppo" else 4
    cfg = config(tiny_base, prompt_file, tmp_path, iterations=8, **{
        "ppo.algo": algo, "rollout.samples_per_prompt": k, "rollout.prompts_per_iteration": 8 if k == 1 else 4,
        "rollout.batch_size": 16, "ppo.epochs": 4 if algo == "ppo" else 2})
    final = ppo.main(cfg)
    tok = load_tokenizer(tiny_base)
    before = _mean_reward(tiny_base, tok, prompt_file)
    after = _mean_reward(tmp_path / "model", tok, prompt_file)
    assert after > before + 1.0, (before, after)                # ~0.7 -> 2 to 7 letters
    rows = read_metrics(tmp_path)
    assert len(rows) == cfg.iterations
    for row in rows:
        assert row["logprob_gap_max"] < 1e-5                    # generation == training forward
    expected = {"proxy_reward_mean", "kl_to_ref", "beta", "entropy", "response_length", "clipfrac",
                "approx_kl", "policy_loss", "tokens_per_s", "logprob_gap_max", "grad_norm"}
    assert expected <= set(rows[-1])
    assert ("explained_variance" in rows[-1]) == ("value_loss" in rows[-1]) == (algo == "ppo")
    assert final["algo"] == algo
    # the packing the models allow is recorded beside the user's setting, which stays as given
    assert final["packing"] == "shared"
    assert "packing: true" in (tmp_path / "config.yaml").read_text()
    # separate placement: policy + reference (+ value for PPO); a Python reward holds no model
    assert final["params_ratio_vs_one_model"] == pytest.approx(2.0 + (algo == "ppo"), abs=0.01)


def test_shared_placement_on_a_built_in_task_reports_gold_and_final_eval(tiny_base, tmp_path):
    cfg = load_config(ppo.Config, None, [
        f"model={tiny_base}", f"reward=python:{__name__}:count_e", "task=sentiment", "roles=shared",
        f"out_dir={tmp_path}", "iterations=2", "rollout.prompts_per_iteration=8",
        "rollout.sampling.max_new_tokens=6", "ppo.epochs=1", "ppo.minibatch_size=8",
        "optim.lr=3e-2", "eval.num_prompts=8", "eval.sampling.max_new_tokens=6", "lora.r=4"])
    final = ppo.main(cfg)
    rows = read_metrics(tmp_path)
    assert all("gold_reward_mean" in r and r["logprob_gap_max"] < 1e-5 for r in rows)
    for key in ("gold_reward_mean", "gold_reward_std", "kl_to_ref", "initial_gold_reward_mean",
                "params_in_memory", "peak_rss_mb"):
        assert key in final, key
    assert final["kl_estimator"] == "k1" and final["kl_to_ref"] != 0   # vs the disabled adapters
    assert 1.0 < final["params_ratio_vs_one_model"] < 1.5
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 8
    merged = load_causal_lm(tmp_path / "model")                # the policy adapter, merged
    assert sum(p.numel() for p in merged.parameters()) == final["params_one_model"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert list((tmp_path / "tb").glob("events.*"))


# ----------------------------------------------------------------------------- pieces


def test_config_refuses_what_cannot_run(tiny_base):
    base = [f"model={tiny_base}", "reward=gold:sentiment", "task=sentiment"]
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        load_config(ppo.Config, None, base + ["ppo.algo=grpo"])
    with pytest.raises(ConfigError, match="multiple of ppo.minibatch_size"):
        load_config(ppo.Config, None, base + ["rollout.prompts_per_iteration=10"])
    with pytest.raises(ConfigError, match="value_init=reward"):
        load_config(ppo.Config, None, base + ["value_init=reward"])
    with pytest.raises(ConfigError, match="task"):
        load_config(ppo.Config, None, [f"model={tiny_base}", "reward=gold:sentiment"])


def test_iteration_prompts_cover_each_prompt_once_per_epoch():
    seen = [i for it in range(5) for i in iteration_prompts(10, 4, seed=3, iteration=it)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != list(range(10))                         # shuffled
    assert iteration_prompts(10, 4, 3, 2) == seen[8:12]     # a pure function of iteration


def test_hacking_figure_plots_proxy_and_gold_against_sqrt_kl(tmp_path):
    rows = [{"step": i + 1, "kl_to_ref": kl, "proxy_reward_mean": p, "gold_reward_mean": g}
            for i, (kl, p, g) in enumerate([(0.0, 0.1, 0.4), (4.0, 0.9, 0.6), (16.0, 1.5, 0.2)])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [(title, fig)] = ppo.figures(tmp_path)
    assert "sqrt(KL" in title
    proxy_line = fig.axes[0].get_lines()[0]
    gold_line = fig.axes[1].get_lines()[0]
    assert list(proxy_line.get_xdata()) == [0.0, 2.0, 4.0]
    assert list(proxy_line.get_ydata()) == [0.1, 0.9, 1.5]
    assert list(gold_line.get_ydata()) == [0.4, 0.6, 0.2]
    # With a success threshold the rollouts' success rate gets its own curve per iteration.
    for r, s in zip(rows, (0.25, 0.5, 0.75)):
        r["gold_success_mean"] = s
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [_, (title, fig)] = ppo.figures(tmp_path)
    assert "Success rate" in title
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [0.25, 0.5, 0.75]
