"""Command line: ``alignkit <command> [--config FILE] [dotted.key=value ...]``.

Thin on purpose. Two kinds of command:

* stages (:data:`alignkit.stages.STAGES`): a module with a frozen ``Config`` dataclass and ``main(cfg)``; the CLI
  loads ``--config`` YAML, applies dotted overrides, validates, and calls ``main``.
* tools (``TOOLS``): a module with ``add_arguments(parser)`` and ``run(args)`` for commands
  that are not training runs (the preference store, the annotation app, the server).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from alignkit.stages import STAGES

TOOLS: dict[str, str] = {
    "store": "alignkit.feedback.store_cli",
    "annotate": "alignkit.feedback.annotate.cli",
    "serve": "alignkit.serve",
}


def _stage_command(name: str, argv: list[str]) -> None:
    from alignkit.config import ConfigError, load_config

    module = importlib.import_module(STAGES[name])
    from alignkit.cli_help import keys_help, trl_hint

    parser = argparse.ArgumentParser(prog=f"alignkit {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=keys_help(module.Config))
    parser.add_argument("--config", help="YAML file with this stage's settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run already in out_dir (its checkpoints, metrics and "
                             "outputs) and start afresh")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    for i, arg in enumerate(argv):
        ours = arg in ("--config", "--overwrite", "--help") or arg.startswith("--config=")
        after = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None
        hint = trl_hint(arg, module.Config, after) if arg.startswith("--") and not ours else None
        if hint is not None:
            print(f"alignkit {name}: {hint} (alignkit {name} --help lists every key)",
                  file=sys.stderr)
            sys.exit(2)
    args = parser.parse_intermixed_args(argv)   # flags before, between or after the overrides
    try:
        if hasattr(module, "load"):  # a stage with its own file layout (the pipeline)
            if not args.config:
                raise ConfigError(f"alignkit {name} needs --config FILE")
            cfg = module.load(args.config, args.overrides)
        else:
            cfg = load_config(module.Config, args.config, args.overrides)
        if args.overwrite:
            _delete_run(Path(cfg.out_dir))
    except ConfigError as exc:
        print(f"alignkit {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    from alignkit.data.io import DataError

    try:
        metrics = module.main(cfg)
    except (DataError, ConfigError) as exc:
        print(f"alignkit {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(metrics, dict) and os.environ.get("RANK", "0") == "0" and name != "pipeline":
        from alignkit.report import write_stage_report

        print(f"alignkit {name}: report {write_stage_report(name, module, cfg.out_dir, metrics)}")


RUN_MARKERS = ("config.yaml", "fingerprint.json", "metrics.jsonl", "metrics.json", "summary.json")


def _delete_run(out_dir: Path) -> None:
    """``--overwrite``: remove the run folder ``out_dir``, refusing a folder that holds no
    alignkit run (nothing else is ever deleted)."""
    import shutil

    from alignkit.config import ConfigError

    if not out_dir.exists():
        return
    if not out_dir.is_dir() or not any((out_dir / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"--overwrite: {out_dir} holds no alignkit run (none of "
                          f"{', '.join(RUN_MARKERS)}); not deleting it")
    print(f"alignkit: --overwrite: deleting the run in {out_dir}", file=sys.stderr)
    shutil.rmtree(out_dir)


def _tool_command(name: str, argv: list[str]) -> None:
    module = importlib.import_module(TOOLS[name])
    parser = argparse.ArgumentParser(prog=f"alignkit {name}", description=module.__doc__)
    module.add_arguments(parser)
    module.run(parser.parse_args(argv))


def _quiet_libraries() -> None:
    """Our own progress lines say what runs; the libraries' per-load progress bars add noise."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    # One process speaks for a multi-process run (accelerate / torchrun set RANK): the others
    # would repeat every dataset line; their warnings and errors still show.
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = sorted(STAGES) + sorted(TOOLS)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: alignkit <command> [--config FILE] [key=value ...]\n\ncommands: "
              + ", ".join(commands))
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    _quiet_libraries()
    if name in STAGES:
        _stage_command(name, rest)
    elif name in TOOLS:
        _tool_command(name, rest)
    else:
        print(f"alignkit: unknown command {name!r}; commands: {', '.join(commands)}", file=sys.stderr)
        sys.exit(2)
