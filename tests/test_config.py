from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignkit.config import ConfigError, apply_overrides, build, load_config, load_yaml, require
from alignkit.engine.training import LoopConfig, OptimConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 3
    path: str | None = None
    flag: bool = False
    optim: Inner = field(default_factory=Inner)

    def __post_init__(self):
        require(self.steps > 0, "steps must be > 0")


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run\noptim:\n  lr: 0.5\n")
    cfg = load_config(Outer, f, ["optim.lr=3e-5", "steps=7", "optim.kind=b", "path=/tmp/x"])
    assert cfg == Outer(name="run", steps=7, path="/tmp/x", optim=Inner(lr=3e-5, kind="b"))
    assert isinstance(cfg.optim.lr, float)


def test_int_widens_to_float_but_not_bool():
    assert build(Inner, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="'lr'"):
        build(Inner, {"lr": True})


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lrr": 1}}, "unknown config key 'optim.lrr'"),
    ({"stepz": 1}, "unknown config key 'stepz'"),
    ({"steps": "many"}, "config key 'steps': expected an integer"),
    ({"optim": {"kind": "c"}}, "config key 'optim.kind': 'c' is not one of"),
    ({"optim": {"betas": 0.9}}, "config key 'optim.betas': expected a list"),
    ({"optim": 3}, "config key 'optim': expected a section"),
    ({"flag": "yes"}, "config key 'flag': expected true or false"),
    ({"steps": 0}, "steps must be > 0"),
])
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        build(Outer, data)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_and_required_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad, listed = tmp_path / "bad.yaml", tmp_path / "list.yaml"
    bad.write_text("a: [1\n")
    listed.write_text("- 1\n")
    with pytest.raises(ConfigError, match=f"config file {bad}: invalid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match=f"judge config {listed}: the top level must be a mapping"):
        load_yaml(listed, what="judge config")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}

    @dataclass(frozen=True)
    class Needs:
        model: str

    with pytest.raises(ConfigError, match="'model' is required"):
        build(Needs, {})


def test_stage_sections_validate():
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        build(OptimConfig, {"lr": 0.0})
    assert build(LoopConfig, {"batch_size": 4}).batch_size == 4


def test_partial_section_keeps_the_stage_defaults():
    @dataclass(frozen=True)
    class Stage:
        optim: Inner = field(default_factory=lambda: Inner(lr=0.5, kind="b"))

    cfg = build(Stage, {"optim": {"lr": 0.1}})
    assert cfg.optim == Inner(lr=0.1, kind="b")   # kind from the stage default, not Inner's
    assert build(Stage, {}).optim == Inner(lr=0.5, kind="b")


def test_yaml_boolean_words_name_a_literal_option(tmp_path):
    """YAML 1.1 reads ``no`` as false: ``train.mixed_precision=no`` still means the option."""
    assert load_config(LoopConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(LoopConfig, path).mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"True is not one of \['auto', 'no', 'bf16'\]"):
        load_config(LoopConfig, None, ["mixed_precision=yes"])


@pytest.mark.parametrize("text", [".nan", "nan", "NaN"])
def test_nan_is_no_number(text):
    """NaN would slip past every ``__post_init__`` range check (comparisons with it are false)."""
    with pytest.raises(ConfigError, match=r"'weight_decay': expected a number, got NaN"):
        load_config(OptimConfig, None, [f"weight_decay={text}"])
    assert load_config(OptimConfig, None, ["max_grad_norm=.inf"]).max_grad_norm == float("inf")
