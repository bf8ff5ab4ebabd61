"""``alignkit <stage> --help`` lists every config key from the dataclasses; TRL's flags get the
key that does their job here."""

import importlib

import pytest

from alignkit.cli import main
from alignkit.config import ConfigError, load_config
from alignkit.cli_help import config_keys, trl_hint
from alignkit.stages import STAGES


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if s != "pipeline"))
def test_help_lists_every_key_of_every_stage(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        main([stage, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    config = importlib.import_module(STAGES[stage]).Config
    listed = [line.split()[0] for line in out.split("config keys")[1].splitlines()[1:] if line.strip()]
    assert listed == [k for k, *_ in config_keys(config)] and len(listed) > 5
    for key in listed:   # each is a real key: setting it never meets "unknown config key"
        try:
            load_config(config, None, [f"{key}=0"])
        except ConfigError as exc:
            assert "unknown config key" not in str(exc), key


def test_help_shows_the_stages_own_defaults_types_and_comments(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "float = 5e-05" in rows["optim.lr"]                       # DPO's, not the optimiser's
    assert "str = dpo   # a loss registered with dap=" in rows["loss.name"]
    assert "str = ''" in rows["model"]


@pytest.mark.parametrize("argv,expect", [
    (["sft", "--learning_rate", "2e-5"], "--learning_rate is TRL's; here it is optim.lr=2e-5"),
    (["dpo", "--model_name_or_path=runs/sft/model"], "here it is model=runs/sft/model"),
    (["ppo", "--num_generations", "4"], "here it is rollout.samples_per_prompt=4"),
    (["sft", "--bf16"], "here it is train.mixed_precision=bf16"),
    (["rm", "--gradient_accumulation_steps", "4"], "here it is train.batch_size (the global batch"),
])
def test_a_trl_flag_names_our_key(argv, expect, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expect in err, err


def test_flags_trl_lacks_get_no_hint():
    from alignkit.stages.sft import Config

    assert trl_hint("--frobnicate", Config) is None
    assert trl_hint("--num_generations", Config) is None     # SFT samples nothing
