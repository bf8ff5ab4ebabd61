"""Rollouts for PPO: log-prob parity of generation vs the training forward (both placements),
minibatch slicing, reward normalisation by hand, checkpointable sampler state."""

import json
import math

import pytest
import torch

from alignkit.engine.generation import rollout_logps

from alignkit.engine.sampling import SamplingConfig
from alignkit.engine.models import LoraSpec, load_tokenizer
from alignkit.engine.rl.roles import RoleSpec, build_roles
from alignkit.engine.rl.rollout import (GeneratorState, RunningMoments, ScoreConfig, collect,
                              training_scores)


pytestmark = pytest.mark.usefixtures("one_thread")


def count_e(prompts, responses):
    return [float(r.count("e")) for r in responses]


def _prompts(tok, n=8):
    texts = [f"Review {i}: the film" + " was" * (i % 4) for i in range(n)]
    return texts, [tok(t)["input_ids"] for t in texts]


def _collect(roles, tok, sampling, seed=0, n=8):
    texts, ids = _prompts(tok, n)
    return collect(roles, ids, texts, tok, sampling, torch.Generator().manual_seed(seed),
                   batch_size=3, gold=count_e)


@pytest.mark.parametrize("placement", ["separate", "shared"])
@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=10),
                                      SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20,
                                                     top_p=0.9)])
def test_recorded_logps_match_the_training_forward(tiny_base, placement, sampling):
    tok = load_tokenizer(tiny_base)
    spec = RoleSpec(model=str(tiny_base), reference=None, reward=f"python:{__name__}:count_e",
                    lora=LoraSpec(r=4, alpha=8))
    roles = build_roles(placement, spec, tok, needs_value=True)
    if placement == "shared":  # a policy adapter that differs from the reference
        with torch.no_grad():
            for p in roles.policy_parameters():
                p.add_(0.2 * torch.randn_like(p))
    s = _collect(roles, tok, sampling)
    r = s.experience.rollout
    assert len(set(r.prompt_mask.sum(-1).tolist())) > 1          # left padding really varies
    assert s.logprob_gap_max < 1e-5
    torch.testing.assert_close(s.experience.old_logps, r.logps, rtol=0, atol=1e-5)
    assert (s.experience.old_logps[r.response_mask == 0] == 0).all()
    # What the reward source saw is the decoded rollout; the gold runs on the same texts.
    assert s.proxy.tolist() == count_e(None, s.responses) == s.gold.tolist()
    if placement == "shared":
        assert (s.experience.ref_logps - s.experience.old_logps).abs().max() > 1e-3


def test_take_slices_rows_and_trims_padding_without_changing_logps(tiny_base):
    tok = load_tokenizer(tiny_base)
    spec = RoleSpec(model=str(tiny_base), reference=None, reward=f"python:{__name__}:count_e")
    roles = build_roles("separate", spec, tok, needs_value=True)
    exp = _collect(roles, tok, SamplingConfig(max_new_tokens=10)).experience
    exp.advantages = torch.arange(len(exp), dtype=torch.float32)
    sub = exp.take([6, 1])
    width = int(exp.mask[[6, 1]].sum(-1).max())
    assert sub.rollout.response_ids.shape[1] == width
    assert sub.rollout.prompt_ids.shape[1] == max(exp.rollout.prompt_mask[[6, 1]].sum(-1).tolist())
    assert sub.advantages.tolist() == [6.0, 1.0]
    torch.testing.assert_close(sub.values, exp.values[[6, 1], :width])
    with torch.no_grad():
        torch.testing.assert_close(rollout_logps(roles.policy, sub.rollout),
                                   exp.old_logps[[6, 1], :width], rtol=0, atol=1e-6)


def test_running_moments_equal_the_statistics_of_everything_seen():
    batches = [torch.tensor([1.0, 2.0, 4.0]), torch.tensor([-3.0]), torch.tensor([0.5, 7.0])]
    m = RunningMoments()
    for b in batches:
        m.update(b)
    everything = torch.cat(batches).double()
    assert m.count == 6
    assert m.mean == pytest.approx(float(everything.mean()), abs=1e-12)   # 11.5 / 6
    assert m.std == pytest.approx(float(everything.std()), abs=1e-12)     # unbiased
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert restored.state_dict() == m.state_dict()


def test_training_scores_by_hand():
    proxy = torch.tensor([1.0, 3.0, -2.0, 6.0])
    finished = torch.tensor([True, False, True, True])
    assert training_scores(proxy, finished, ScoreConfig(no_eos_penalty=1.5),
                           RunningMoments()).tolist() == [1.0, 1.5, -2.0, 6.0]
    # standardize with the batch as the only history: mean 1.625, unbiased std of the penalised
    # scores [1, 1.5, -2, 6] = sqrt(10.729166...) ; then clip at 1.
    m = RunningMoments()
    out = training_scores(proxy, finished, ScoreConfig(normalize="standardize", no_eos_penalty=1.5,
                                                       clip=1.0), m)
    std = math.sqrt(((1 - 1.625) ** 2 + (1.5 - 1.625) ** 2 + (-2 - 1.625) ** 2
                     + (6 - 1.625) ** 2) / 3)
    expect = [max(-1.0, min(1.0, (x - 1.625) / std)) for x in (1.0, 1.5, -2.0, 6.0)]
    assert out.tolist() == pytest.approx(expect, abs=1e-6)
    scaled = training_scores(proxy, torch.ones(4, dtype=torch.bool), ScoreConfig(normalize="scale"),
                             RunningMoments())
    assert scaled.tolist() == pytest.approx((proxy / proxy.std()).tolist(), abs=1e-6)


def test_generator_state_round_trip_replays_the_same_draws():
    a = GeneratorState(7)
    torch.rand(3, generator=a.generator)
    saved = a.state_dict()
    first = torch.rand(5, generator=a.generator)
    b = GeneratorState(0)
    b.load_state_dict(saved)
    assert torch.equal(torch.rand(5, generator=b.generator), first)


def test_prompt_records_give_the_text_rewards_read_and_the_ids_training_uses(tiny_base, tmp_path):
    from alignkit.data.formats import prompt_ids
    from alignkit.engine.rl.rollout import encoded_prompts

    tok = load_tokenizer(tiny_base)
    path = tmp_path / "prompts.jsonl"
    records = [{"prompt": "The film was"}, {"prompt": "A slow start"}, {"prompt": "unused"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    texts, ids = encoded_prompts(str(path), 2, tok)
    assert texts == ["The film was", "A slow start"]
    assert ids == [prompt_ids(r, tok) for r in records[:2]]
    texts, ids = encoded_prompts("task:sentiment", 3, tok)
    from alignkit.tasks import get_task
    assert texts == get_task("sentiment").prompts("train", 3)
    assert ids[0][0] == tok.bos_token_id and len(ids) == 3
