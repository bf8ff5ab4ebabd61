"""The stages: one file each, composing the engine's building blocks; no stage imports another.

:data:`STAGES` is the one registry of stages: ``alignkit <command>`` runs them, and the pipeline
composes every entry but itself under the command's name with ``_`` for ``-`` (``label-ai`` is
the pipeline's ``label_ai``). A stage module has a frozen ``Config`` dataclass and
``main(cfg) -> dict``; optionally ``load(path, overrides)`` (its own config file layout) and
``figures(run_dir)`` (its report's plots).
"""

STAGES: dict[str, str] = {
    "base": "alignkit.stages.base",
    "sft": "alignkit.stages.sft",
    "rm": "alignkit.stages.reward",
    "dpo": "alignkit.stages.dpo",
    "label": "alignkit.stages.label",
    "label-ai": "alignkit.stages.judge",
    "judge-model": "alignkit.stages.judge_model",
    "evaluate": "alignkit.stages.evaluate",
    "ppo": "alignkit.stages.ppo",
    "rest": "alignkit.stages.rest",
    "bon": "alignkit.stages.bon",
    "pipeline": "alignkit.stages.pipeline",
}
