"""``alignkit pipeline``: run stages end to end and write ``summary.json`` and ``report.html``.

Each stage's section in the YAML is that stage's own config; the pipeline only fills in the
paths that connect them (the SFT model is the RM's backbone, the labels are its data, ...).
A stage whose ``metrics.json`` already exists (a stage writes it last, atomically) is skipped, so
an interrupted pipeline resumes where it stopped (and a stage interrupted mid-run resumes from
its own last checkpoint); a done stage whose settings or inputs changed since is refused
(``alignkit.tracking.check_fingerprint``), never silently reused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alignkit.config import ConfigError, apply_overrides, build, load_yaml, require
from alignkit.stages import STAGES

# The stages the pipeline composes, by their section names (the registry's, "-" -> "_").
MODULES = {name.replace("-", "_"): module for name, module in STAGES.items() if name != "pipeline"}

# Stages that hold a judge: the pipeline's top-level ``judge:`` section (one judge, its templates
# and prices) is shared by them, under their own ``judge`` keys.
JUDGE_STAGES = ("judge_model", "label_ai")


@dataclass(frozen=True)
class Config:
    out_dir: str = "runs/demo"
    task: str = "sentiment"
    stages: list[str] = field(default_factory=lambda: ["base", "sft", "label", "rm", "evaluate@sft"])
    from_run: str | None = None   # take base/sft/labels/rm from this earlier run's folder
    # The sampling backend of every stage that samples (each sampling section's ``engine`` and
    # the local judge's ``judge.engine``): hf | vllm; null keeps each section's own.
    sampling_engine: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)   # stage name -> that stage's config

    def __post_init__(self):
        unknown = [s for s in self.stages if s.split("@")[0] not in MODULES]
        require(not unknown, f"unknown pipeline stage {unknown[:1]}; known: {sorted(MODULES)}")
        stray = [k for k in self.sections if k.split("@")[0] not in MODULES and k != "judge"]
        require(not stray, f"unknown config section {stray[:1]}: not a stage "
                f"({sorted(MODULES)}) nor 'judge'")
        from alignkit.engine.sampling import BACKENDS

        require(self.sampling_engine is None or self.sampling_engine in BACKENDS,
                f"sampling_engine {self.sampling_engine!r} is not one of {sorted(BACKENDS)}")
        for name, section in self.sections.items():
            require(section is None or isinstance(section, dict), f"config key {name!r}: expected a "
                    f"section (mapping), got {type(section).__name__}")


def stage_dir(kind: str, variant: str = "") -> str:
    """Folder of a stage: ``dpo`` -> ``dpo``; ``dpo@beta0.3`` -> ``dpo_beta0.3``."""
    return f"{kind}_{variant}" if variant else kind.replace("@", "_")


def _wiring(out: Path, src: Path, task: str, variant: str,
            label_chat: bool = False) -> dict[str, Callable[[], dict]]:
    """Defaults that connect one stage's outputs to the next stage's inputs (``src``: where the
    upstream artifacts live, ``out`` unless the pipeline reuses an earlier run). Labels sampled
    through the chat template (``label.chat``) train RM and DPO as chat turns (``data.chat``)."""
    base_model = str(src / "base" / "model")
    sft_model = str(src / "sft" / "model")
    labels = src / "labels"
    rm_model = f"model:{src / 'rm' / 'model'}"
    return {
        "base": lambda: {"task": task, "out_dir": str(out / "base")},
        "sft": lambda: {"model": base_model, "out_dir": str(out / "sft"),
                        "data": {"train": f"task:{task}", "eval": f"task:{task}"}},
        "label": lambda: {"policy": sft_model, "task": task, "out_dir": str(labels)},
        # rm@ai: the same reward model trained on the AI judge's labels of the same pairs.
        "rm": lambda: {"model": sft_model, "out_dir": str(out / stage_dir("rm", variant)),
                       "gold_task": task,
                       "data": {"train": str((out / "labels_ai" if variant == "ai" else labels)
                                             / "train.jsonl"),
                                "eval": str(labels / "eval.jsonl"), "chat": label_chat}},
        "dpo": lambda: {"model": sft_model, "out_dir": str(out / stage_dir("dpo", variant)),
                        "data": {"train": str(labels / "train.jsonl"), "chat": label_chat}},
        "ppo": lambda: {"model": sft_model, "reward": rm_model, "task": task,
                        "out_dir": str(out / stage_dir("ppo", variant)), "eval": {"num_prompts": 0}},
        "rest": lambda: {"model": sft_model, "reward": rm_model, "task": task,
                         "out_dir": str(out / stage_dir("rest", variant))},
        "bon": lambda: {"policy": sft_model, "reward": rm_model, "task": task,
                        "out_dir": str(out / stage_dir("bon", variant))},
        "judge_model": lambda: {"model": base_model, "task": task,
                                "out_dir": str(out / "judge_model")},
        "label_ai": lambda: {"pairs_dir": str(labels), "out_dir": str(out / "labels_ai"),
                             "judge": {"model": str(out / "judge_model" / "model")}},
        "evaluate": lambda: {"policy": str((src if variant in ("", "sft") else out)
                                           / stage_dir(variant or "sft") / "model"),
                             "reference": sft_model, "task": task,
                             "proxy_reward": f"model:{src / 'rm' / 'model'}",
                             "out_dir": str(out / f"eval_{stage_dir(variant or 'sft')}")},
    }


def _merge(defaults: dict, given: dict) -> dict:
    merged = dict(defaults)
    for k, v in given.items():
        merged[k] = _merge(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return merged


def stage_config(name: str, cfg: Config) -> Any:
    kind, _, variant = name.partition("@")
    module = importlib.import_module(MODULES[kind])
    # "evaluate@dpo" takes the shared "evaluate" section, then its own.
    given = _merge(cfg.sections.get(kind, {}) or {}, cfg.sections.get(name, {}) or {}) \
        if variant else (cfg.sections.get(name, {}) or {})
    if not isinstance(given, dict):
        raise ConfigError(f"config key {name!r}: expected a mapping")
    if kind in JUDGE_STAGES:
        own = given.get("judge") or {}
        # A judge that is no mapping is left for the stage's config to refuse, naming the key.
        given = {**given, "judge": _merge(cfg.sections.get("judge") or {}, own) if isinstance(own, dict)
                 else own}
    out = Path(cfg.out_dir)
    src = Path(cfg.from_run) if cfg.from_run else out
    label_chat = bool((cfg.sections.get("label") or {}).get("chat", False))
    data = _merge(_wiring(out, src, cfg.task, variant, label_chat)[kind](), given)
    try:
        built = build(module.Config, data)
        return module, (built if cfg.sampling_engine is None
                        else with_sampling_engine(built, cfg.sampling_engine))
    except ConfigError as exc:
        raise ConfigError(f"pipeline stage {name!r}: {exc}") from None


def with_sampling_engine(config, engine: str):
    """``config`` (a stage's frozen dataclass) with every nested sampling section's ``engine`` and
    every judge's ``engine`` set to ``engine``: the pipeline's ``sampling_engine`` switch."""
    from alignkit.engine.judges import JudgeConfig
    from alignkit.engine.sampling import SamplingConfig

    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    changes = {f.name: with_sampling_engine(getattr(config, f.name), engine)
               for f in dataclasses.fields(config) if f.init}
    if isinstance(config, (SamplingConfig, JudgeConfig)):
        changes["engine"] = engine
    changed = {k: v for k, v in changes.items() if v is not getattr(config, k)}
    return dataclasses.replace(config, **changed) if changed else config


def main(cfg: Config) -> dict:
    from alignkit.data.io import write_json
    from alignkit.engine import vllm_engine
    from alignkit.report import write_report
    from alignkit.tracking import check_fingerprint

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = {name: stage_config(name, cfg) for name in cfg.stages}  # validate all up front
    summary: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name, (module, stage_cfg) in configs.items():
        done = Path(stage_cfg.out_dir) / "metrics.json"   # written last, atomically
        try:
            extended = done.exists() and check_fingerprint(stage_cfg.out_dir, stage_cfg)
        except ConfigError as exc:
            raise ConfigError(f"pipeline stage {name!r} is done with other settings: {exc}") from None
        if done.exists() and not extended:
            print(f"[pipeline] {name}: already done ({done}), skipping", flush=True)
            summary[name] = json.loads(done.read_text())
            continue
        print(f"[pipeline] {name}: starting -> {stage_cfg.out_dir}", flush=True)
        start = time.time()
        summary[name] = module.main(stage_cfg)
        # A stage's vLLM engine (sampling.engine=vllm) goes with the stage: its memory and the
        # one-rank torch.distributed group it made are not the next stage's.
        vllm_engine.shutdown()
        timings[name] = time.time() - start
        print(f"[pipeline] {name}: done in {timings[name]:.0f}s", flush=True)
    summary = headline(summary)
    write_json(out / "summary.json", summary)
    report = write_report(out, summary, configs)
    print(f"[pipeline] summary: {out / 'summary.json'}\n[pipeline] report:  {report}", flush=True)
    return summary


RLAIF_HEADLINE = ("ai_agreement_with_simulated", "ai_kappa_with_simulated", "position_bias_rate",
                  "cost_per_label", "labels_per_second")


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """Fold ``evaluate@<stage>`` results into ``<stage>`` so every policy stage reports
    ``gold_reward_mean`` and ``kl_to_ref`` (to the SFT model) in one place; with AI labels, add an
    ``rlaif`` entry: the judge's agreement, position bias and cost, and both reward models' gold
    pair accuracy side by side."""
    out = dict(summary)
    for name, metrics in summary.items():
        kind, _, variant = name.partition("@")
        if kind == "evaluate" and variant in out:
            out[variant] = {**out[variant], **{k: v for k, v in metrics.items()
                                               if k.startswith(("gold_", "proxy_", "kl_"))
                                               or k == "response_length"}}
    if isinstance(summary.get("label_ai"), dict):
        rlaif = {k: summary["label_ai"][k] for k in RLAIF_HEADLINE if k in summary["label_ai"]}
        for name, key in (("rm", "rm_gold_pair_accuracy_simulated_labels"),
                          ("rm@ai", "rm_gold_pair_accuracy_ai_labels")):
            if isinstance(summary.get(name), dict) and "gold_pair_accuracy" in summary[name]:
                rlaif[key] = summary[name]["gold_pair_accuracy"]
        out["rlaif"] = rlaif
    return out


def load(path: str, overrides: list[str]) -> Config:
    """The pipeline YAML is flat: top-level stage sections sit beside out_dir/task/stages."""
    raw = apply_overrides(load_yaml(path), overrides)
    top = {k: raw.pop(k) for k in ("out_dir", "task", "stages", "from_run", "sampling_engine")
           if k in raw}
    return build(Config, {**top, "sections": raw})
