"""The pipeline end to end at toy size: every stage runs, wiring holds, summary + report exist,
and a second run skips finished stages."""

import json

import pytest

from alignkit.stages import pipeline

TINY = """
out_dir: {out}
task: sentiment
stages: [base, sft, label, rm, evaluate@sft, dpo, evaluate@dpo]
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
    assert set(on_disk) == {"base", "sft", "label", "rm", "evaluate@sft", "dpo", "evaluate@dpo"}
    for policy in ("sft", "dpo"):
        assert {"gold_reward_mean", "kl_to_ref"} <= set(on_disk[policy])
    assert on_disk["sft"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)  # SFT is the reference
    assert {"pair_accuracy", "gold_pair_accuracy"} <= set(on_disk["rm"])
    assert on_disk["dpo"]["steps"] == 2
    report = (out / "report.html").read_text()
    assert "Gold reward vs KL" in report and report.count("data:image/png") >= 3
    # Every stage wrote its own config, metrics.jsonl or metrics.json.
    for stage in ("base", "sft", "rm", "dpo"):
        assert (out / stage / "config.yaml").exists() and (out / stage / "metrics.json").exists()
    capsys.readouterr()
    again = pipeline.main(pipeline.load(str(cfg_file), []))
    assert "already done" in capsys.readouterr().out
    assert again["dpo"]["train_loss"] == summary["dpo"]["train_loss"]


def test_pipeline_refuses_unknown_stage_and_bad_section(tmp_path):
    from alignkit.config import ConfigError

    f = tmp_path / "p.yaml"
    f.write_text("stages: [base, ppx]\n")
    with pytest.raises(ConfigError, match="unknown pipeline stage"):
        pipeline.load(str(f), [])
    f.write_text("out_dir: x\nstages: [sft]\nsft: {optim: {lrr: 1}}\n")
    with pytest.raises(ConfigError, match="pipeline stage 'sft'.*'optim.lrr'"):
        pipeline.main(pipeline.load(str(f), []))
