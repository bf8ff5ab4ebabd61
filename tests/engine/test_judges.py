"""AI judges: template rendering, soft-label and d-RLAIF arithmetic, swap averaging, the store's
request cache across restarts, cost bookkeeping, the local backend's candidate log-probs against
an independent computation, and the label-ai stage end to end on a tiny model."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.engine.judges import (
    Answer,
    JudgeConfig,
    LocalBackend,
    PairwiseJudge,
    PointwiseJudge,
    PriceConfig,
    Request,
    RequestFailed,
    TemplateConfig,
    candidate_logps,
    drlaif_reward,
    expected_score,
    load_stage_config,
    parse_verdict,
    position_bias_rate,
    render,
    render_messages,
    render_text,
    soft_preference,
    swap_average,
    template_version,
)
from alignkit.data.store import PreferenceStore

FIELDS = {"prompt": "Say hi", "response_a": "Hello!", "response_b": "Go away."}


# -- templates -------------------------------------------------------------------------------


def test_pairwise_chat_rendering_is_exact():
    t = TemplateConfig(preamble="Judge.", item="P: {prompt}\n1: {response_a}\n2: {response_b}",
                       question="Better? 1 or 2.",
                       few_shot=[{"prompt": "x", "response_a": "good", "response_b": "bad",
                                  "answer": "1"}])
    assert render_messages(t, FIELDS) == [
        {"role": "system", "content": "Judge."},
        {"role": "user", "content": "P: x\n1: good\n2: bad\nBetter? 1 or 2."},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "P: Say hi\n1: Hello!\n2: Go away.\nBetter? 1 or 2."},
    ]


def test_question_first_layout():
    t = TemplateConfig(preamble="", item="1: {response_a}\n2: {response_b}", question="Which?",
                       question_first=True)
    assert render_messages(t, FIELDS) == [{"role": "user", "content": "Which?\n1: Hello!\n2: Go away."}]


def test_chain_of_thought_is_two_steps():
    t = TemplateConfig(preamble="", item="{prompt}|{response_a}|{response_b}", chain_of_thought=True,
                       rationale_request="Why?", verdict_request="So: 1 or 2?")
    step1 = render_messages(t, FIELDS)
    assert step1 == [{"role": "user", "content": "Say hi|Hello!|Go away.\nWhy?"}]
    step2 = render_messages(t, FIELDS, rationale="The first is polite.")
    assert step2 == step1 + [{"role": "assistant", "content": "The first is polite."},
                             {"role": "user", "content": "So: 1 or 2?"}]


def test_text_rendering_ends_with_the_answer_prefix():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "Q2"}]
    assert render_text(messages, "Answer:") == "S\n\nQ1\n\nAnswer: 2\n\nQ2\n\nAnswer:"
    t = TemplateConfig(preamble="S", item="{prompt} {response_a} {response_b}", question="?")
    assert render(t, FIELDS, "text") == "S\n\nSay hi Hello! Go away.\n?\n\nAnswer:"


def test_template_version_tracks_content():
    t = TemplateConfig()
    assert template_version(t) == template_version(TemplateConfig())
    assert template_version(t).startswith("pairwise-v1#")
    # An edited template with the same version string is still a different template.
    assert template_version(replace(t, question="Which one?")) != template_version(t)


@pytest.mark.parametrize("kwargs", [
    {"item": "{prompt} {response}"},                           # pointwise field in a pairwise item
    {"few_shot": [{"prompt": "p", "response_a": "a", "response_b": "b", "answer": "3"}]},
    {"few_shot": [{"prompt": "p", "response_a": "a", "response_b": "b", "answer": "1"}],
     "chain_of_thought": True},                                # CoT example without a rationale
])
def test_bad_templates_are_refused(kwargs):
    with pytest.raises(ConfigError):
        TemplateConfig(**kwargs)


@pytest.mark.parametrize("text, labels, expected", [
    ("1", ("1", "2"), "1"), ("Answer: 2.", ("1", "2"), "2"), (" 2\n", ("1", "2"), "2"),
    ("3", ("1", "2"), None), ("1.5", ("1", "2"), None), ("", ("1", "2"), None),
    ("maybe", ("1", "2"), None), ("10", tuple(str(k) for k in range(1, 11)), "10"),
    ("I give it 7/10", tuple(str(k) for k in range(1, 11)), "7"),
])
def test_parse_verdict(text, labels, expected):
    assert parse_verdict(text, labels) == expected


# -- arithmetic ------------------------------------------------------------------------------


def test_soft_preference_from_logprobs():
    # p = exp(lp1) / (exp(lp1) + exp(lp2)) = 0.6 / (0.6 + 0.2)
    assert soft_preference(math.log(0.6), math.log(0.2)) == pytest.approx(0.75, abs=1e-12)
    assert soft_preference(-1000.0, -1001.0) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert soft_preference(-2.0, -math.inf) == 1.0
    assert soft_preference(-math.inf, -2.0) == 0.0
    assert soft_preference(-math.inf, -math.inf) is None


def test_swap_average_and_position_bias():
    # P(a) = (q(a,b) + 1 - q(b,a)) / 2: slot-1 probabilities 0.8 and 0.3 -> (0.8 + 0.7) / 2
    assert swap_average(0.8, 0.3) == pytest.approx(0.75, abs=1e-12)
    assert swap_average(0.8, None) == 0.8
    assert swap_average(None, 0.3) == pytest.approx(0.7, abs=1e-12)
    assert swap_average(None, None) is None
    # A judge that always picks slot 1 cancels out to 0.5.
    assert swap_average(0.9, 0.9) == pytest.approx(0.5, abs=1e-12)
    # biased (slot 1 twice), consistent, undecided (skipped), biased (slot 2 twice), one missing
    pairs = [(0.9, 0.8), (0.9, 0.2), (0.5, 0.9), (0.1, 0.3), (0.9, None)]
    assert position_bias_rate(pairs) == pytest.approx(2 / 3, abs=1e-12)
    assert position_bias_rate([]) is None


def test_drlaif_expected_score_and_rescaling():
    # s = sum_k k p(k): p(7) = 0.25, p(9) = 0.75 -> 8.5 -> r = (8.5 - 5.5) / 4.5
    lps = {"7": math.log(0.25), "9": math.log(0.75), "3": -math.inf}
    assert expected_score(lps) == pytest.approx(8.5, abs=1e-12)
    assert drlaif_reward(8.5) == pytest.approx(2 / 3, abs=1e-12)
    assert drlaif_reward(10.0) == 1.0 and drlaif_reward(1.0) == -1.0 and drlaif_reward(5.5) == 0.0
    # Log-probs over a subset are renormalised: only the ratios matter.
    assert expected_score({"2": -5.0, "4": -5.0}) == pytest.approx(3.0, abs=1e-12)
    assert expected_score({"1": -math.inf}) is None


def test_cost_arithmetic():
    price = PriceConfig(input_per_million=2.5, output_per_million=10.0)
    # 1000 in * 2.5 / 1e6 + 200 out * 10 / 1e6
    assert price.cost(1000, 200) == pytest.approx(0.0045, abs=1e-15)
    assert PriceConfig().cost(10**6, 10**6) == 0.0


# -- judges with a scripted backend ----------------------------------------------------------


class Scripted:
    """A backend whose slot-1 probability is a function of the request; counts calls."""

    def __init__(self, q_of, tokens=(100, 1)):
        self.q_of, self.tokens, self.calls = q_of, tokens, 0

    def complete(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            user = r.prompt[-1]["content"]
            q = self.q_of(user)
            if q is None:
                out.append(Answer("no idea", None, *self.tokens, 0.01))
            elif q == "fail":
                out.append(RequestFailed("boom"))
            else:
                out.append(Answer("1" if q >= 0.5 else "2",
                                  {"1": math.log(q), "2": math.log(1 - q)}, *self.tokens, 0.01))
        return out


def _cfg(**kw):
    return JudgeConfig(model="scripted", id="scripted-judge",
                       price=PriceConfig(input_per_million=3.0, output_per_million=15.0), **kw)


def _prefers_polite(user: str):
    # Slot 1 wins with 0.9 when it holds "Hello!", else 0.2: content plus a slight slot-1 pull.
    first = user.split("Response 1: ")[1].split("\n")[0]
    return 0.9 if first == "Hello!" else 0.2


def test_pairwise_judge_averages_both_orders_and_costs():
    backend = Scripted(_prefers_polite)
    judge = PairwiseJudge(_cfg(), backend=backend)
    [j] = judge.judge(["Say hi"], ["Hello!"], ["Go away."])
    assert j.slot_probs == pytest.approx([0.9, 0.2])
    assert j.prob_a == pytest.approx((0.9 + 1 - 0.2) / 2) and j.label == "a"
    # two requests of 100 prompt + 1 completion tokens at $3 / $15 per million
    assert j.cost == pytest.approx(2 * (100 * 3 + 15) / 1e6, abs=1e-15)
    assert judge.counts["requests"] == 2 and backend.calls == 2


def test_unparseable_answers_are_counted_not_dropped():
    judge = PairwiseJudge(_cfg(), backend=Scripted(lambda user: None))
    [j] = judge.judge(["p"], ["a"], ["b"])
    assert j.label is None and j.prob_a is None
    assert judge.counts["unparseable"] == 2
    # One order unparseable: the other decides alone.
    judge = PairwiseJudge(_cfg(), backend=Scripted(
        lambda user: 0.8 if "Response 1: a\n" in user else None))
    [j] = judge.judge(["p"], ["a"], ["b"])
    assert j.prob_a == pytest.approx(0.8) and judge.counts["unparseable"] == 1


def test_cache_hits_after_restart(tmp_path):
    db = tmp_path / "store.db"
    backend = Scripted(_prefers_polite)
    args = (["Say hi", "Say hi"], ["Hello!", "Go away."], ["Go away.", "Hey there"])
    with PreferenceStore(db) as store:
        first = PairwiseJudge(_cfg(), backend=backend, store=store).label(*args)
    assert backend.calls == 4
    with PreferenceStore(db) as store:                 # a new process: a new store object
        again = PairwiseJudge(_cfg(), backend=backend, store=store)
        second = again.label(*args)
        assert backend.calls == 4                      # nothing sent twice
        assert again.counts["cache_hits"] == 4 and again.counts["cost_spent"] == 0.0
        assert [j.prob_a for j in second] == [j.prob_a for j in first]
        assert [j.cost for j in second] == pytest.approx([j.cost for j in first])
        assert len(store.comparisons(source="ai")) == 2   # and no label recorded twice
        # A changed template is a different request: not served from the cache.
        edited = PairwiseJudge(_cfg(pairwise=TemplateConfig(question="Which is nicer?")),
                               backend=backend, store=store)
        edited.judge(*args)
        assert backend.calls == 8


def test_failed_requests_are_not_cached(tmp_path):
    with PreferenceStore(tmp_path / "s.db") as store:
        judge = PairwiseJudge(_cfg(), backend=Scripted(lambda user: "fail"), store=store)
        [j] = judge.label(["p"], ["a"], ["b"])
        assert j.label is None and judge.counts["failed"] == 2
        assert store.count("judgements_cache") == 0 and store.count("comparisons") == 0


def test_labels_land_in_the_store_in_its_pair_orientation(tmp_path):
    with PreferenceStore(tmp_path / "s.db") as store:
        # The store first saw this pair as (Go away., Hello!): our a is its b.
        pair_id = store.add_pair_from_texts("Say hi", "Go away.", "Hello!")
        judge = PairwiseJudge(_cfg(), backend=Scripted(_prefers_polite), store=store)
        [j] = judge.label(["Say hi"], ["Hello!"], ["Go away."])
        [row] = store.comparisons(source="ai")
        assert row["pair_id"] == pair_id and row["annotator"] == "scripted-judge"
        assert row["label"] == "b" and row["prob_a"] == pytest.approx(1 - j.prob_a)
        assert row["template_version"] == template_version(TemplateConfig())
        assert row["cost"] == pytest.approx(j.cost)
        assert json.loads(row["comment"])["prompt_tokens"] == 200


def test_pointwise_judge_is_a_drlaif_reward():
    def scores(user):
        return {"9": 0.0, "10": math.log(3.0)} if "great" in user else {"1": 0.0}

    class Points:
        def complete(self, requests):
            return [Answer("", scores(r.prompt[-1]["content"]), 10, 1, 0.0) for r in requests]

    judge = PointwiseJudge(_cfg(), backend=Points())
    # p(9) = 1/4, p(10) = 3/4 -> s = 9.75; p(1) = 1 -> s = 1
    assert judge(["p", "p"], ["great", "meh"]) == pytest.approx([(9.75 - 5.5) / 4.5, -1.0])


# -- the local backend ---------------------------------------------------------------------


def _tiny(path):
    from alignkit.engine.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path)
    return load_causal_lm(path, tokenizer=tok).eval(), tok


def test_candidate_logps_single_tokens_match_an_unpadded_forward(tiny_base):
    model, tok = _tiny(tiny_base)
    prompts = [tok("I watched it")["input_ids"], tok("The plot was very dull and")["input_ids"]]
    cands = [tok(x, add_special_tokens=False)["input_ids"] for x in ("1", "2")]
    assert all(len(c) == 1 for c in cands)
    got, greedy = candidate_logps(model, prompts, cands, tok.pad_token_id)
    for b, p in enumerate(prompts):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
        assert got[b].tolist() == pytest.approx([lp[c[0]].item() for c in cands], abs=1e-5)
        assert greedy[b].item() == lp.argmax().item()


def test_candidate_logps_multi_token_candidates(tiny_base):
    """"1" and "10" share their first token: P("1") must exclude the mass that continues to "10"."""
    model, tok = _tiny(tiny_base)
    prompt = tok("I watched it")["input_ids"]
    one, ten = (tok(x, add_special_tokens=False)["input_ids"] for x in ("1", "10"))
    assert len(ten) == 2 and ten[0] == one[0]
    got, _ = candidate_logps(model, [prompt], [one, ten], tok.pad_token_id)
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
        second = torch.log_softmax(model(torch.tensor([prompt + one])).logits[0, -1], -1)
    p_zero = second[ten[1]].exp().item()
    assert got[0, 0].item() == pytest.approx(first[one[0]].item() + math.log(1 - p_zero), abs=1e-5)
    assert got[0, 1].item() == pytest.approx(first[one[0]].item() + second[ten[1]].item(), abs=1e-5)


def test_local_backend_answers_in_request_order_from_length_sorted_batches(tiny_base):
    """Requests of mixed lengths, batched shortest first (two per forward, right-padded, the LM
    head at the verdict positions only): each answer is its own prompt's, as an unpadded forward
    of that prompt alone gives it."""
    from alignkit.data.formats import encode_prompt

    model, tok = _tiny(tiny_base)
    texts = ["The plot was very dull and slow and", "Hi", "I watched it twice", "A", "It was fine"]
    backend = LocalBackend(str(tiny_base), batch_size=2, model=model, tokenizer=tok)
    answers = backend.complete([Request(t, 1, ("1", "2")) for t in texts])
    one, two = (tok(x, add_special_tokens=False)["input_ids"][0] for x in ("1", "2"))
    for text, answer in zip(texts, answers):
        ids = encode_prompt(text, tok)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        assert answer.label_logps == pytest.approx({"1": lp[one].item(), "2": lp[two].item()},
                                                   abs=1e-5)
        assert answer.prompt_tokens == len(ids)


def test_local_judge_matches_its_own_model(tiny_base):
    """The local backend's soft label is the formula applied to the model's next-token log-probs."""
    from alignkit.data.formats import encode_prompt

    model, tok = _tiny(tiny_base)
    cfg = JudgeConfig(model=str(tiny_base), swap=False)
    [j] = PairwiseJudge(cfg).judge(["Say hi"], ["Hello!"], ["Go away."])
    ids = encode_prompt(render(cfg.pairwise, FIELDS, "chat"), tok)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
    one, two = (tok(x, add_special_tokens=False)["input_ids"][0] for x in ("1", "2"))
    assert j.prob_a == pytest.approx(soft_preference(lp[one].item(), lp[two].item()), abs=1e-5)


# -- configs, the reward source and the stage -----------------------------------------------


def test_stage_config_merges_the_shared_judge_section(tmp_path):
    from alignkit.stages.judge import Config

    path = tmp_path / "judge.yaml"
    path.write_text("judge: {model: m, pairwise: {question: 'Q?', version: v1}}\n"
                    "label_ai: {pairs_dir: d, judge: {pairwise: {version: v2}}}\n"
                    "judge_model: {model: base}\n")
    cfg = load_stage_config(Config, str(path), "label_ai", ["judge.swap=false"])
    assert cfg.judge.model == "m" and cfg.judge.swap is False
    assert cfg.judge.pairwise.question == "Q?" and cfg.judge.pairwise.version == "v2"
    with pytest.raises(ConfigError, match="pairs_dir"):
        load_stage_config(Config, str(path), "label_ai", ["pairs_dir="])


def _write_judge_yaml(path, model, store=None):
    store_line = f"  store: {store}\n" if store else ""
    path.write_text(f"judge:\n  model: {model}\n  batch_size: 8\n{store_line}")


def test_judge_reward_source(tiny_base, tmp_path):
    from alignkit.engine.scoring import make_reward_source

    spec = tmp_path / "judge.yaml"
    _write_judge_yaml(spec, tiny_base, store=tmp_path / "cache.db")
    source = make_reward_source(f"judge:{spec}", chat=False)
    rewards = source(["I watched", "I watched"], [" a great film.", " a dull film."])
    scores = source.scores(["I watched", "I watched"], [" a great film.", " a dull film."])
    assert rewards == pytest.approx([(s - 5.5) / 4.5 for s in scores])
    assert all(-1.0 <= r <= 1.0 for r in rewards) and all(1.0 <= s <= 10.0 for s in scores)
    assert source.counts["cache_hits"] == 2        # the second call was served from the store


def test_label_ai_stage_end_to_end(tiny_base, tmp_path):
    from alignkit.cli import main as cli_main

    pairs_dir = tmp_path / "labels"
    pairs_dir.mkdir()
    pairs = [{"prompt": f"I watched film {i}", "response_a": f" it was good {i}.",
              "response_b": f" it was bad {i}."} for i in range(6)]
    (pairs_dir / "pairs_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    # Simulated labels of the same pairs: a preferred on even pairs, b on odd ones.
    sim = [{"prompt": p["prompt"], "chosen": p["response_a" if i % 2 == 0 else "response_b"],
            "rejected": p["response_b" if i % 2 == 0 else "response_a"]} for i, p in enumerate(pairs)]
    (pairs_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sim))
    config = tmp_path / "judge.yaml"
    _write_judge_yaml(config, tiny_base)
    with config.open("a") as fh:
        fh.write(f"  price: {{input_per_million: 1.0, output_per_million: 2.0}}\n"
                 f"label_ai:\n  pairs_dir: {pairs_dir}\n  splits: [train]\n"
                 f"  out_dir: {tmp_path / 'ai'}\n")
    cli_main(["label-ai", "--config", str(config)])
    metrics = json.loads((tmp_path / "ai" / "metrics.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "ai" / "train.jsonl").read_text().splitlines()]
    assert metrics["labels"] == 6 - metrics["unlabelled"] and metrics["requests"] == 12
    assert len(records) == metrics["train_pairs"] == metrics["labels"] - metrics["ties"]
    # Agreement with the simulated labels, recomputed from the output files.
    sim_chosen = {r["prompt"]: r["chosen"] for r in sim}
    agree = sum(sim_chosen[r["prompt"]] == r["chosen"] for r in records) / len(records)
    assert metrics["ai_agreement_with_simulated"] == pytest.approx(agree)
    assert metrics["shared_pairs"] == len(records)
    # Kappa in the pairs' sampled orientation (a store oriented by the reference labels would
    # read every reference label as "a" and give kappa 0 whatever the judge did).
    from alignkit.data.store import cohen_kappa

    by_prompt = {p["prompt"]: p for p in pairs}
    ai_ab = ["a" if by_prompt[r["prompt"]]["response_a"] == r["chosen"] else "b" for r in records]
    sim_ab = ["a" if i % 2 == 0 else "b" for i in range(6)]
    sim_of = {p["prompt"]: x for p, x in zip(pairs, sim_ab)}
    expected = cohen_kappa([(x, sim_of[r["prompt"]]) for x, r in zip(ai_ab, records)])
    assert metrics["ai_kappa_with_simulated"] == pytest.approx(expected)
    # $ per label: every request is billed its prompt tokens at $1/M and 1 token at $2/M.
    assert metrics["cost_per_label"] == pytest.approx(
        (metrics["prompt_tokens"] * 1.0 + metrics["completion_tokens"] * 2.0) / 1e6 / 6)
    assert all(0.5 < r["label_prob"] <= 1.0 for r in records)
    # A re-run pays for nothing and adds no label.
    (tmp_path / "ai" / "metrics.json").unlink()
    cli_main(["label-ai", "--config", str(config)])
    again = json.loads((tmp_path / "ai" / "metrics.json").read_text())
    assert again["cache_hits"] == 12 and again["cost_spent"] == 0.0
    assert again["cost_per_label"] == pytest.approx(metrics["cost_per_label"])
    with PreferenceStore(tmp_path / "ai" / "store.db") as store:
        assert len(store.comparisons(source="ai")) == 6


def test_judge_labeler_for_online_dpo(tiny_base, tmp_path):
    from alignkit.engine.judges import make_judge_labeler

    spec = tmp_path / "judge.yaml"
    _write_judge_yaml(spec, tiny_base, store=tmp_path / "labels.db")
    labeler = make_judge_labeler(str(spec))
    prompts, a, b = ["I watched"] * 3, [" good", " bad", " fine"], [" bad", " great", " dull"]
    records = labeler(prompts, a, b)
    judgements = labeler.judge.judge(prompts, a, b)      # served from the cache
    decided = [j for j in judgements if j.label in ("a", "b")]
    assert len(records) == len(decided)
    for r, j, x, y in zip(records, decided, a, b):
        assert (r["chosen"], r["rejected"]) == ((x, y) if j.label == "a" else (y, x))
        assert r["label_prob"] == pytest.approx(max(j.prob_a, 1 - j.prob_a))
    with PreferenceStore(tmp_path / "labels.db") as store:
        assert len(store.comparisons(source="ai")) == 3


def test_report_figures(tmp_path):
    from alignkit.stages.judge import summary_figures

    pairs = [("p", f"x{i}", f"y{i}") for i in range(4)]
    sim = [{"prompt": p, "chosen": x, "rejected": y} for p, x, y in pairs]
    ai = [{"prompt": p, "chosen": x if i < 3 else y, "rejected": y if i < 3 else x,
           "label_prob": 0.9} for i, (p, x, y) in enumerate(pairs)]
    for name, rows in (("sim.jsonl", sim), ("ai.jsonl", ai)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"label": {"train": str(tmp_path / "sim.jsonl")},
               "label_ai": {"train": str(tmp_path / "ai.jsonl")},
               "rm": {"gold_pair_accuracy": 0.76}, "rm@ai": {"gold_pair_accuracy": 0.7}}
    got = summary_figures(summary)
    assert [t for t, _ in got] == ["AI labels vs simulated labels",
                                   "Reward models: simulated vs AI labels"]
    # One confidence bin (0.9) holding 3 agreeing labels of 4.
    offsets = got[0][1].axes[0].collections[0].get_offsets()
    assert len(offsets) == 1 and list(offsets[0]) == pytest.approx([0.925, 0.75])
    assert summary_figures({}) == []


# -- the offline judge LM (alignkit judge-model) ------------------------------------------


def test_judge_training_data_comes_from_the_writers_latents():
    from alignkit.stages.judge_model import Config, judging_examples, score_of, sft_records
    from alignkit.tasks.sentiment import reviews

    assert [score_of(x) for x in (-1.0, -0.5, 0.0, 0.5, 1.0)] == [1, 3, 6, 8, 10]
    cfg = Config(model="unused", min_latent_gap=0.3)
    pairs, points = judging_examples(cfg, 20, 5, seed=0, min_gap=0.3)
    corpus = reviews(6 * 20 + 5, cfg.corpus_seed)
    latent = {r.text: r.sentiment for r in corpus}
    for fields, answer, _ in pairs:
        # Each response continues its own review; find the two reviews it came from.
        a = next(t for t in latent if (fields["prompt"] + fields["response_a"]) in t)
        b = next(t for t in latent if fields["response_b"].strip() in t and t != a)
        assert abs(latent[a] - latent[b]) >= 0.3
        assert answer == ("1" if latent[a] > latent[b] else "2")
    assert len(pairs) == 20 and len(points) == 5
    [record] = sft_records(cfg, pairs[:1], [])
    assert record["prompt"] == render(cfg.judge.pairwise, pairs[0][0], "chat")
    assert record["completion"] == [{"role": "assistant", "content": pairs[0][1]}]
    cot = replace(cfg, judge=replace(cfg.judge, pairwise=replace(cfg.judge.pairwise,
                                                                 chain_of_thought=True)))
    [talk] = sft_records(cot, pairs[:1], [])
    assert [m["role"] for m in talk["messages"]][-4:] == ["user", "assistant", "user", "assistant"]
    assert talk["messages"][-3]["content"] == pairs[0][2] and talk["messages"][-1]["content"] == pairs[0][1]


def test_judge_model_stage_trains_a_judge_the_judge_code_can_use(tiny_base, tmp_path):
    from alignkit.config import build
    from alignkit.stages import judge_model

    cfg = build(judge_model.Config, {
        "model": str(tiny_base), "out_dir": str(tmp_path / "jm"), "pairwise_examples": 24,
        "pointwise_examples": 8, "eval_examples": 6, "max_response_words": 8,
        "judge": {"model": str(tmp_path / "jm" / "model"), "batch_size": 8},
        "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 8, "mixed_precision": "no"}})
    metrics = judge_model.main(cfg)
    assert metrics["steps"] == 2 and metrics["examples"] == 32
    assert 0.0 <= metrics["heldout_pair_accuracy"] <= 1.0
    assert -1.0 <= metrics["heldout_score_corr"] <= 1.0
    [j] = PairwiseJudge(cfg.judge).judge(["I watched"], [" a good film."], [" a bad film."])
    assert 0.0 < j.prob_a < 1.0


def test_label_with_a_judge_writes_ai_labels_of_the_same_pairs(tiny_base, tmp_path):
    from alignkit.cli import main as cli_main

    config = tmp_path / "judge.yaml"
    _write_judge_yaml(config, tiny_base)
    out = tmp_path / "labels"
    cli_main(["label", f"policy={tiny_base}", "train_prompts=5", "eval_prompts=3",
              "sampling.max_new_tokens=6", f"out_dir={out}", f"judge={config}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"] == str(out / "ai" / "train.jsonl")       # the stage's output: AI labels
    assert metrics["simulated_train"] == str(out / "train.jsonl")
    pairs = [json.loads(x) for x in (out / "pairs_train.jsonl").read_text().splitlines()]
    ai = [json.loads(x) for x in (out / "ai" / "train.jsonl").read_text().splitlines()]
    assert len(ai) == metrics["train_pairs"] and 0 < len(ai) <= len(pairs)
    sampled = {(p["prompt"], frozenset((p["response_a"], p["response_b"]))) for p in pairs}
    assert all((r["prompt"], frozenset((r["chosen"], r["rejected"]))) in sampled for r in ai)
    eval_pairs = (out / "pairs_eval.jsonl").read_text().splitlines()
    assert metrics["requests"] == 2 * (len(pairs) + len(eval_pairs))  # both orders of every pair
    assert "ai_agreement_with_simulated" in metrics and "position_bias_rate" in metrics
