"""Run one benchmark cell in this process and print ``BENCH_RESULT {json}``.

Usage: <venv>/bin/python bench/worker.py '<json spec>'
The spec names the side (alignkit | trl), the case and its sizes; see bench/run.py.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from common import Skip, emit, rss_mb, seed_all, set_threads  # noqa: E402


def main() -> int:
    spec = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    threads = set_threads()
    seed_all(spec["seed"])
    if spec["side"] == "alignkit":
        import alignkit_cases as cases
    else:
        import trl_cases as cases
    import transformers

    transformers.logging.set_verbosity_error()
    base = {"side": spec["side"], "case": spec["case"], "threads": threads,
            "rss_after_import_mb": rss_mb(), "versions": _versions()}
    try:
        result = cases.CASES[spec["case"]](spec)
    except Skip as e:
        emit({**base, "skipped": str(e)})
        return 0
    except Exception as e:  # reported, not raised: the parent records the failure and goes on
        traceback.print_exc()
        emit({**base, "error": f"{type(e).__name__}: {e}"})
        return 1
    emit({**base, **result, "wall_s": time.perf_counter() - t0})
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "alignkit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
