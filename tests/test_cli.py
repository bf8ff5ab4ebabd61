"""The command line refuses bad input with one clear line naming file, line and field (or key)."""

import json

import pytest

from alignkit.cli import main


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "the plot", "completion": " was fine."}


@pytest.mark.parametrize("stage,rows,expect", [
    ("sft", [GOOD, '{"prompt": "x", "completion": ', GOOD], ":2: invalid JSON"),
    ("sft", [GOOD, {"prompt": "x"}], ":2: field 'completion': missing"),
    ("sft", [GOOD, GOOD, {"prompt": "x", "completion": ""}], ":3: field 'completion': empty completion"),
    ("rm", [{"prompt": "p", "chosen": " a", "rejected": " a"}],
     ":1: field 'chosen': chosen and rejected are identical"),
])
def test_bad_records_stop_with_file_line_field(tiny_base, tmp_path, capsys, stage, rows, expect):
    data = write(tmp_path / "bad.jsonl", rows)
    code, err = run_cli([stage, f"model={tiny_base}", f"data.train={data}",
                         f"out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert str(data) + expect in err, err


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    code, err = run_cli(["sft", "model=x", "optim.lrate=1e-3"], capsys)
    assert code == 2 and "unknown config key 'optim.lrate'" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\ntrain:\n  batch_size: many\n")
    code, err = run_cli(["sft", "--config", str(cfg)], capsys)
    assert code == 2 and "config key 'train.batch_size': expected an integer" in err


def test_unknown_command(capsys):
    code, err = run_cli(["frobnicate"], capsys)
    assert code == 2 and "unknown command 'frobnicate'" in err


def count_e(prompts, responses):
    return [float(r.count("e")) for r in responses]


def test_a_stage_run_on_its_own_writes_a_report_with_its_figures(tiny_base, tmp_path, capsys):
    main(["ppo", f"model={tiny_base}", f"reward=python:{__name__}:count_e", "task=sentiment",
          f"out_dir={tmp_path}", "iterations=2", "rollout.prompts_per_iteration=4",
          "rollout.batch_size=4", "rollout.sampling.max_new_tokens=4", "ppo.epochs=1",
          "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "eval.num_prompts=4",
          "eval.sampling.max_new_tokens=4", "tensorboard=false"])
    report = (tmp_path / "report.html").read_text()
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert "sqrt(KL to the reference)" in report           # the stage's own figure
    assert report.count("data:image/png") == 2             # curves + that figure
    assert "Samples (ppo)" in report and "gold_reward_mean=" in report
