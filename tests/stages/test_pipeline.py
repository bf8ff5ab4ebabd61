"""The pipeline end to end at toy size: every stage runs, wiring holds, summary + report exist,
and a second run skips finished stages."""

import json

import pytest

from alignkit.stages import pipeline

TINY = """
out_dir: {out}
task: sentiment
stages: [base, sft, label, rm, evaluate@sft, dpo, evaluate@dpo, ppo, evaluate@ppo, rest,
         evaluate@rest, judge_model, label_ai, rm@ai]
base:
  num_documents: 300
  vocab_size: 400
  arch: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}
  train: {{max_steps: 4, batch_size: 16, micro_batch_size: 16, mixed_precision: "no", log_every: 1}}
sft:
  data: {{task_samples: 64, eval_samples: 16, max_length: 96}}
  train: {{max_steps: 3, batch_size: 16, micro_batch_size: 8, mixed_precision: "no", log_every: 1}}
label:
  train_prompts: 24
  eval_prompts: 12
  sampling: {{max_new_tokens: 16}}
rm:
  data: {{max_length: 96}}
  train: {{max_steps: 2, batch_size: 8, micro_batch_size: 8, mixed_precision: "no"}}
dpo:
  data: {{max_length: 96}}
  train: {{max_steps: 2, batch_size: 8, micro_batch_size: 8, mixed_precision: "no"}}
ppo:
  iterations: 2
  rollout: {{prompts_per_iteration: 4, batch_size: 4, sampling: {{max_new_tokens: 8}}}}
  ppo: {{epochs: 1, minibatch_size: 4, micro_batch_size: 4}}
  report_to: none
rest:
  grow_steps: 1
  grow: {{num_prompts: 8, samples_per_prompt: 2, sampling: {{max_new_tokens: 8}}}}
  filter: {{schedule: percentile, thresholds: [50]}}
  improve: {{max_length: 64, train: {{batch_size: 4, micro_batch_size: 4, mixed_precision: "no"}}}}
  eval: {{num_prompts: 4, sampling: {{max_new_tokens: 8}}}}
judge:
  batch_size: 16
  pairwise: {{question_first: true, item: "1: {{prompt}}{{response_a}}\n2: {{prompt}}{{response_b}}",
             question: "Which is more positive?"}}
judge_model:
  pairwise_examples: 16
  pointwise_examples: 8
  eval_examples: 4
  train: {{max_steps: 2, batch_size: 8, micro_batch_size: 8, mixed_precision: "no"}}
label_ai:
  limit: 8
rm@ai:
  train: {{max_steps: 1, batch_size: 4, micro_batch_size: 4, mixed_precision: "no"}}
evaluate:
  num_prompts: 8
  sampling: {{max_new_tokens: 16}}
"""


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(TINY.format(out=out))
    summary = pipeline.main(pipeline.load(str(cfg_file), []))
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) == {"base", "sft", "label", "rm", "evaluate@sft", "dpo", "evaluate@dpo",
                            "ppo", "evaluate@ppo", "rest", "evaluate@rest", "judge_model",
                            "label_ai", "rm@ai", "rlaif"}
    for policy in ("sft", "dpo", "ppo", "rest"):
        assert {"gold_reward_mean", "kl_to_ref"} <= set(on_disk[policy])
        # The same 8 test prompts for every policy: the frontier compares like with like.
        evaluated = (out / f"eval_{policy}" / "samples.jsonl").read_text().splitlines()
        assert [json.loads(r)["prompt"] for r in evaluated] == \
            [json.loads(r)["prompt"] for r in (out / "eval_sft" / "samples.jsonl").read_text().splitlines()]
    assert on_disk["ppo"]["kl_to_ref"] == on_disk["evaluate@ppo"]["kl_to_ref"] != 0
    # PPO and ReST trained against the demo's RM; rm@ai learned from the judge's labels.
    assert json.loads((out / "ppo" / "metrics.json").read_text())["iterations"] == 2
    assert "rm/model" in (out / "ppo" / "config.yaml").read_text()
    ai_train = (out / "labels_ai" / "train.jsonl").read_text().splitlines()
    assert 4 <= len(ai_train) <= 8 and on_disk["label_ai"]["train_pairs"] == len(ai_train)
    assert "labels_ai/train.jsonl" in (out / "rm_ai" / "config.yaml").read_text()
    assert {"ai_agreement_with_simulated", "position_bias_rate", "cost_per_label"} <= set(on_disk["label_ai"])
    rlaif = on_disk["rlaif"]                 # the RLAIF headline, next to the stages
    assert rlaif["ai_agreement_with_simulated"] == on_disk["label_ai"]["ai_agreement_with_simulated"]
    assert rlaif["cost_per_label"] == on_disk["label_ai"]["cost_per_label"]
    assert rlaif["rm_gold_pair_accuracy_ai_labels"] == on_disk["rm@ai"]["gold_pair_accuracy"]
    assert rlaif["rm_gold_pair_accuracy_simulated_labels"] == on_disk["rm"]["gold_pair_accuracy"]
    assert "gold_pair_accuracy" in on_disk["rm@ai"]
    judge_cfg = (out / "labels_ai" / "config.yaml").read_text()
    assert "Which is more positive?" in judge_cfg and "judge_model/model" in judge_cfg
    assert on_disk["sft"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)  # SFT is the reference
    assert {"pair_accuracy", "gold_pair_accuracy"} <= set(on_disk["rm"])
    assert on_disk["dpo"]["steps"] == 2
    report = (out / "report.html").read_text()
    assert "Gold reward vs KL" in report and report.count("data:image/png") >= 3
    assert "sqrt(KL to the reference)" in report                   # ppo's own figure
    assert "ReST: per-step rewards" in report and "Reward models: simulated vs AI labels" in report
    # Every stage wrote its own config, metrics.jsonl or metrics.json.
    for stage in ("base", "sft", "rm", "dpo"):
        assert (out / stage / "config.yaml").exists() and (out / stage / "metrics.json").exists()
    capsys.readouterr()
    again = pipeline.main(pipeline.load(str(cfg_file), []))
    assert "already done" in capsys.readouterr().out
    assert again["dpo"]["train_loss"] == summary["dpo"]["train_loss"]
    # A done stage whose settings changed since is refused, naming the stage and the setting.
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match=r"pipeline stage 'dpo' is done with other settings.*"
                                          r"\(loss\.beta\)"):
        pipeline.main(pipeline.load(str(cfg_file), ["dpo.loss.beta=0.5"]))


def test_pipeline_refuses_unknown_stage_and_bad_section(tmp_path):
    from alignkit.config import ConfigError

    f = tmp_path / "p.yaml"
    f.write_text("stages: [base, ppx]\n")
    with pytest.raises(ConfigError, match="unknown pipeline stage"):
        pipeline.load(str(f), [])
    f.write_text("out_dir: x\nstages: [sft]\nsft: {optim: {lrr: 1}}\n")
    with pytest.raises(ConfigError, match="pipeline stage 'sft'.*'optim.lrr'"):
        pipeline.main(pipeline.load(str(f), []))


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").rglob("*.yaml")))
def test_every_shipped_config_validates(path):
    """Each file in configs/ builds into its command's typed config (pipeline files: every
    stage); a file whose header shows its command (``alignkit <stage> --config <this file>``)
    builds into that stage's config."""
    import importlib
    import re

    import yaml

    from alignkit.config import load_config
    from alignkit.engine.judges import load_stage_config
    from alignkit.stages import STAGES, dpo, judge, judge_model, ppo, rest

    text = open(path).read()
    raw = yaml.safe_load(text)
    shown = re.search(rf"alignkit ([\w-]+) --config {re.escape(path)}", text)
    if shown and shown.group(1) in STAGES and "stages" not in raw and "judge_model" not in raw:
        load_config(importlib.import_module(STAGES[shown.group(1)]).Config, path, [])
    elif "stages" in raw:
        cfg = pipeline.load(path, [])
        for name in cfg.stages:
            pipeline.stage_config(name, cfg)
    elif "judge_model" in raw or "label_ai" in raw:
        load_stage_config(judge_model.Config, path, "judge_model", [])
        load_stage_config(judge.Config, path, "label_ai", [])
    else:
        module = (ppo if "iterations" in raw else rest if "grow_steps" in raw
                  else dpo if "loss" in raw else None)
        assert module is not None, f"{path}: which command is this config for?"
        load_config(module.Config, path, [])


def test_chat_labels_train_rm_and_dpo_as_chat_turns(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("stages: [label, rm, dpo]\nlabel: {chat: true}\n")
    cfg = pipeline.load(str(f), [])
    assert pipeline.stage_config("rm", cfg)[1].data.chat is True
    assert pipeline.stage_config("dpo", cfg)[1].data.chat is True
    f.write_text("stages: [label, rm, dpo]\n")
    assert pipeline.stage_config("dpo", pipeline.load(str(f), []))[1].data.chat is False


def test_the_pipeline_composes_the_stage_registry():
    from alignkit.stages import STAGES

    assert pipeline.MODULES["label_ai"] == STAGES["label-ai"] == "alignkit.stages.judge"
    assert set(pipeline.MODULES) == {n.replace("-", "_") for n in STAGES} - {"pipeline"}


def test_sampling_engine_switch_reaches_every_sampling_section():
    """``sampling_engine=vllm`` (one key of the demo) sets the engine of every SamplingConfig of
    every stage and of the local judge; without it every section keeps its own (hf)."""
    import dataclasses

    from alignkit.engine.judges import JudgeConfig
    from alignkit.engine.sampling import SamplingConfig
    from alignkit.stages import pipeline

    def engines(config, path="cfg"):
        if isinstance(config, (SamplingConfig, JudgeConfig)):
            yield path, config.engine
        if dataclasses.is_dataclass(config):
            for f in dataclasses.fields(config):
                yield from engines(getattr(config, f.name), f"{path}.{f.name}")

    def all_engines(overrides):
        cfg = pipeline.load("configs/demo.yaml", overrides)
        return {(name, path): e for name in cfg.stages
                for path, e in engines(pipeline.stage_config(name, cfg)[1])}

    switched = all_engines(["sampling_engine=vllm"])
    default = all_engines([])
    assert switched.keys() == default.keys()
    assert set(default.values()) == {"hf"} and set(switched.values()) == {"vllm"}
    stages = {name.split("@")[0] for name, _ in switched}
    # every demo stage that samples or judges: label, evaluate, ppo (rollout + eval), rest, the judge
    assert {"label", "evaluate", "ppo", "rest", "judge_model", "label_ai"} <= stages
    assert ("ppo", "cfg.rollout.sampling") in switched and ("ppo", "cfg.eval.sampling") in switched
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="sampling_engine .nope. is not one of"):
        pipeline.load("configs/demo.yaml", ["sampling_engine=nope"])
