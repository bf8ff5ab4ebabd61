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
          "eval.sampling.max_new_tokens=4", "report_to=none"])
    report = (tmp_path / "report.html").read_text()
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert "sqrt(KL to the reference)" in report           # the stage's own figure
    assert report.count("data:image/png") == 2             # curves + that figure
    assert "Samples (ppo)" in report and "<td>gold_reward_mean</td><td>" in report


def test_every_stage_run_alone_writes_a_report_titled_by_what_ran(tiny_base, tmp_path, capsys):
    """A GRPO run on a prompt file (no task): titled grpo, final metrics as a table, its curves
    and the last iteration's samples; an SFT run (no figures of its own) gets one too."""
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: the film"} for i in range(8)])
    out = tmp_path / "grpo"
    main(["ppo", f"model={tiny_base}", f"reward=python:{__name__}:count_e", f"out_dir={out}",
          f"rollout.prompts={prompts}", "ppo.algo=grpo", "rollout.samples_per_prompt=2",
          "iterations=2", "rollout.prompts_per_iteration=2", "rollout.batch_size=4",
          "rollout.sampling.max_new_tokens=4", "ppo.epochs=1", "ppo.minibatch_size=4",
          "ppo.micro_batch_size=4", "report_to=none"])
    report = (out / "report.html").read_text()
    assert "<title>alignkit grpo</title>" in report and "<h2>Final metrics</h2>" in report
    assert "<th>metric</th><th>value</th>" in report and "<td>last_proxy_reward_mean</td>" in report
    assert "Samples (grpo)" in report and "proxy_reward=" in report
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4   # the last iteration's
    sft = tmp_path / "sft"
    main(["sft", f"model={tiny_base}", f"out_dir={sft}", *SFT_RUN])
    report = (sft / "report.html").read_text()
    assert "<title>alignkit sft</title>" in report and "<td>train_loss</td>" in report
    assert report.count("data:image/png") == 1             # the loss curve


def test_unreadable_config_files_and_models_stop_with_one_line(tiny_base, tmp_path, capsys):
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"model: \xff\xfe\n")
    for config, expect in ((tmp_path, "is a directory, not a YAML file"),
                           (binary, "not UTF-8 text (byte 7)")):
        code, err = run_cli(["sft", "--config", str(config)], capsys)
        assert code == 2 and f"config file {config}" in err and expect in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    data = write(tmp_path / "d.jsonl", [GOOD] * 4)
    for model, expect in ((empty, "the folder is empty"),
                          (tmp_path / "no" / "such" / "model", "no such file or directory")):
        code, err = run_cli(["sft", f"model={model}", f"data.train={data}",
                             f"out_dir={tmp_path / 'run'}"], capsys)
        assert code == 2 and f"cannot load a model from {model}: {expect}" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("rows,what", [
    ([{"prompt": "only a prompt"}], "prompt records (a prompt only)"),
    ([{"prompt": "p", "chosen": " a", "rejected": " b"}], "preference records (prompt, chosen, rejected)"),
    ([{"prompt": "p", "completion": " a", "label": False}], "unpaired records (prompt, completion, label)"),
])
def test_sft_refuses_data_that_is_no_demonstration(tiny_base, tmp_path, capsys, rows, what):
    data = write(tmp_path / "d.jsonl", rows)
    code, err = run_cli(["sft", f"model={tiny_base}", f"data.train={data}",
                         f"out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2, err
    assert f"{data}:1: {what}, but this stage trains on prompt_completion or messages" in err, err


SFT_RUN = ["data.train=task:sentiment", "data.task_samples=32", "data.max_length=64",
           "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8",
           "train.mixed_precision=no", "train.log_every=1"]


def test_a_changed_rerun_is_refused_and_overwrite_starts_afresh(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["sft", f"model={tiny_base}", f"out_dir={out}", *SFT_RUN]
    main(base)
    code, err = run_cli(base + ["optim.lr=0.5"], capsys)
    assert code == 2 and "(optim.lr)" in err and "--overwrite" in err, err
    main(base + ["optim.lr=0.5", "--overwrite"])
    assert "lr: 0.5" in (out / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    keep = tmp_path / "notarun"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    code, err = run_cli(["sft", f"model={tiny_base}", f"out_dir={keep}", "--overwrite", *SFT_RUN],
                        capsys)
    assert code == 2 and "holds no alignkit run" in err and (keep / "precious.txt").exists()


def test_a_stage_killed_while_saving_its_model_resumes_to_the_same_metrics(tiny_base, tmp_path):
    """The last checkpoint is at the last step: the resumed run trains nothing and reports what
    the uninterrupted one did (train loss, eval metrics), its log holding each step once."""
    import shutil

    out = tmp_path / "run"
    args = ["sft", f"model={tiny_base}", f"out_dir={out}", *SFT_RUN, "data.eval=task:sentiment",
            "data.eval_samples=8"]
    main(args)
    straight = json.loads((out / "metrics.json").read_text())
    lines = (out / "metrics.jsonl").read_text()
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")                      # killed while writing the model
    main(args)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed == straight and resumed["train_loss"] is not None
    assert (out / "metrics.jsonl").read_text() == lines


def test_only_the_main_process_logs_dataset_lines(tiny_base, tmp_path, monkeypatch):
    import logging

    from alignkit.cli import _quiet_libraries

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)       # restored after the test
    for rank, level in (("1", logging.WARNING), ("0", logging.INFO)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(root, "handlers", [])        # basicConfig acts on a bare root only
        root.setLevel(logging.NOTSET)
        _quiet_libraries()
        assert logging.getLogger("alignkit.data").getEffectiveLevel() == level
