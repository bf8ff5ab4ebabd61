"""Per-process peak memory and throughput of an SFT and a DPO step under train.strategy
ddp / fsdp2 / zero3, on a model of Qwen2.5-0.5B's shape with random weights (nothing downloaded).

    .venv/bin/python bench/sharded.py                       # every case x strategy, 2 processes
    .venv/bin/python bench/sharded.py --cases sft --strategies fsdp2,zero3 --steps 2

Each (case, strategy) runs in fresh processes under ``torchrun --nproc_per_node N`` (gloo over
127.0.0.1) through alignkit's own loop (``engine.training.train`` with the stage's loss and
collate: ``lm_loss.loss_for`` for SFT; for DPO the stage's reference pass, then its loss: the
reference, the initial policy, kept as the strategy keeps a frozen model (sharded under fsdp2 /
zero3), its log-probs cached with each process computing its share, then freed). Models are
built as the stages' loaders build them, through the strategy (``Strategy.build``: fsdp2 / zero3
hold the whole model on the main process only). Every rank reports its RSS high-water mark
(``ru_maxrss``: the model build, sharding, the reference pass and the timed steps all count),
the high point of each phase (build; step 1 with ``prepare``; each later step) and its step
times; the table shows the largest rank.

``--ddp-processes 1`` (the default) measures ddp in one process: for the 0.5B shape 2 DDP
processes need ~2 x 13 GB, more than a 24 GB machine has. One DDP process holds what each of N
holds (weights, gradients, AdamW state) less DDP's gradient buckets (4 bytes per parameter), so
the ratio against it is an upper bound of the ratio against real DDP. ``--shape
qwen2.5-0.5b-6layers --ddp-processes 2,1`` measures both on a model with the same widths and
vocabulary and 6 of the 24 layers. Results: ``bench/results/sharded-<date>[-shape].json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Qwen2.5-0.5B's config.json (public): 494M parameters, 136M of them the tied embedding.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
# Qwen2.5-0.5B's widths and vocabulary with 6 of its 24 decoder layers (226M parameters): small
# enough for 2 DDP processes on a 24 GB machine, so the ratio against real DDP is measured.
QWEN25_05B_6L = dict(QWEN25_05B, num_hidden_layers=6)
# --shape tiny: a smoke run of the harness in seconds.
TINY = dict(QWEN25_05B, vocab_size=1000, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {"qwen2.5-0.5b": QWEN25_05B, "qwen2.5-0.5b-6layers": QWEN25_05B_6L, "tiny": TINY}


# ---------------------------------------------------------------------------------------------
# One process of one run.


def _examples(case: str, n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = seq // 4

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    out = []
    for _ in range(n):
        p = ids(prompt)
        if case == "sft":
            c = ids(seq - prompt)
            out.append({"input_ids": p + c, "labels": [-100] * prompt + c})
        else:   # a pair sharing its prompt, completions of the same length
            a, b = ids(seq - prompt), ids(seq - prompt)
            out.append({"chosen_input_ids": p + a, "chosen_labels": [-100] * prompt + a,
                        "rejected_input_ids": p + b, "rejected_labels": [-100] * prompt + b})
    return out


class RssPhases:
    """The resident memory's high point in each phase of a run (build; step 1, which holds
    ``prepare``; each later step), sampled every 20 ms from /proc/self/statm by a thread."""

    def __init__(self):
        import threading

        self.peaks, self.current, self._stop = [], 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss_mb(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page / 2**20

    def _run(self):
        while not self._stop.wait(0.02):
            self.current = max(self.current, self._rss_mb())

    def mark(self):
        self.peaks.append(max(self.current, self._rss_mb()))
        self.current = 0

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def worker(args) -> None:
    import resource
    import tempfile

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from alignkit.data.collate import collate_rows
    from alignkit.engine.dap_loss import LossConfig, cache_reference, collate_dap, make_loss
    from alignkit.engine.lm_loss import loss_for, n_targets
    from alignkit.engine.training import (LoopConfig, OptimConfig, make_accelerator, train,
                                          use_packing)

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    phases = RssPhases()

    accelerator = make_accelerator("no", args.strategy)
    world = accelerator.num_processes
    shape = SHAPES[args.shape]
    config = Qwen2Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)

    def load():   # the whole model, random weights (seeded: the same in every run)
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config)

    def empty():  # the same module from its config: what a sharded build fills
        return Qwen2ForCausalLM._from_config(config)

    batch = args.per_process * world
    steps = args.warmup + args.steps
    loop = LoopConfig(max_steps=steps, batch_size=batch, micro_batch_size=args.per_process,
                      log_every=1, save_every=0, mixed_precision="no", resume="never",
                      strategy=args.strategy)
    optim = OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0, max_grad_norm=1.0)
    examples = _examples(args.case, batch * steps, args.seq, shape["vocab_size"], seed=1)
    pairs = args.case == "dpo"
    if pairs:
        # The reference is the initial policy, as the DPO stage keeps it (built and kept as the
        # strategy keeps a frozen model: sharded under fsdp2 / zero3), its log-probs cached once
        # with each process computing its share; freed before the policy is built.
        reference = accelerator.build(load, empty)
        ref_pack = use_packing(reference, loop, accelerator, pairs=True)
        reference = accelerator.prepare_frozen(reference)
        cache_reference(reference, examples, 0, batch_size=args.per_process, pack=ref_pack,
                        rank=accelerator.process_index, world=world)
        accelerator.release(reference)
        del reference
        gc.collect()
    t0 = time.perf_counter()
    # As the stages' loaders build it: through the strategy (whole on every process for ddp;
    # fsdp2 / zero3: whole on the main process only, see Strategy.build).
    model = accelerator.build(load, empty)
    build_s = time.perf_counter() - t0
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    pack = use_packing(model, loop, accelerator, pairs=pairs)
    after_build_mb = peak_mb()
    phases.mark()
    if pairs:
        model.train()
        collate, weight_of, loss_fn = (lambda b: collate_dap(b, 0, pack), lambda e: 1.0,
                                       make_loss(LossConfig(name="dpo", beta=0.1)))
        lengths = [len(e["chosen_input_ids"]) * 2 for e in examples]
    else:
        collate, weight_of, loss_fn = (lambda b: collate_rows(b, 0, pack), n_targets,
                                       loss_for(model, pack))
        lengths = [len(e["input_ids"]) for e in examples]
    marks: list[float] = []

    class Clock:   # the loop logs after every optimiser step
        def log(self, step, metrics, echo=True):
            marks.append(time.perf_counter())
            phases.mark()

        def truncate_after(self, step):
            pass

        def progress(self, total, done=0, unit="step"):
            class Bar:
                def to(self, n):
                    pass

                def close(self):
                    pass
            return Bar()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(model, examples, lengths=lengths, collate=collate, weight_of=weight_of,
              loss_fn=loss_fn, loop=loop, optim=optim, out_dir=out, tracker=Clock(),
              accelerator=accelerator)
    times = [b - a for a, b in zip([start] + marks, marks)][args.warmup:]
    tokens = sum(lengths[:batch]) // batch * batch   # per optimiser step, all processes
    # One file per rank: the ranks share torchrun's stdout, where their lines can interleave.
    Path(args.result_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps({
        "rank": accelerator.process_index, "processes": world, "strategy": args.strategy,
        "case": args.case, "distribution": accelerator.describe(), "params": params,
        "build_s": build_s, "peak_after_build_mb": after_build_mb, "peak_rss_mb": peak_mb(),
        "phase_peaks_mb": phases.stop(), "step_s": times, "tokens_per_step": tokens,
        "tokens_per_s": tokens / (sum(times) / len(times)) if times else None}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The orchestrator.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args, case: str, strategy: str, processes: int) -> dict:
    import tempfile

    results = tempfile.mkdtemp(prefix="sharded-")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(max(1, 2 // processes)),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    if strategy.startswith("zero"):
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__)),
           "--worker", "--case", case, "--strategy", strategy, "--seq", str(args.seq),
           "--per-process", str(args.per_process), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--shape", args.shape, "--result-dir", results]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    ranks = [json.loads(f.read_text()) for f in sorted(Path(results).glob("rank*.json"))]
    shutil.rmtree(results, ignore_errors=True)
    row = {"case": case, "strategy": strategy, "processes": processes, "rc": proc.returncode,
           "wall_s": time.perf_counter() - t, "ranks": ranks}
    if proc.returncode != 0 or len(ranks) != processes:
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
    return row


def table(rows: list[dict]) -> str:
    """One line per run; ``x ddp``: its per-process peak over the DDP run's of the same case, on
    as many processes where that was measured (else on one: an upper bound, see the module's
    docstring), ``x ddp/1``: over the one-process DDP run's."""
    lines = ["| case | strategy | processes | peak RSS / process (max rank), GiB | x ddp (same N) | "
             "x ddp/1 | step s (mean) | tokens/s (all processes) |",
             "|---|---|---|---|---|---|---|---|"]

    def peak(r):
        return max(k["peak_rss_mb"] for k in r["ranks"])

    ddp = {(r["case"], r["processes"]): peak(r) for r in rows
           if r["strategy"] == "ddp" and len(r["ranks"]) == r["processes"]}
    for r in rows:
        if len(r["ranks"]) != r["processes"]:
            lines.append(f"| {r['case']} | {r['strategy']} | {r['processes']} | failed (rc "
                         f"{r['rc']}) | | | | |")
            continue
        step = sum(sum(k["step_s"]) / len(k["step_s"]) for k in r["ranks"]) / len(r["ranks"])
        same = ddp.get((r["case"], r["processes"]))
        one = ddp.get((r["case"], 1))
        lines.append(f"| {r['case']} | {r['strategy']} | {r['processes']} | {peak(r) / 1024:.2f} | "
                     f"{f'{peak(r) / same:.2f}' if same else '-'} | "
                     f"{f'{peak(r) / one:.2f}' if one else '-'} | {step:.1f} | "
                     f"{r['ranks'][0]['tokens_per_step'] / step:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="sft")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--cases", default="sft,dpo")
    ap.add_argument("--strategies", default="zero3,fsdp2,ddp")
    ap.add_argument("--processes", type=int, default=2, help="for the sharded strategies")
    ap.add_argument("--ddp-processes", default="1",
                    help="comma-separated process counts of the DDP runs (e.g. 2,1)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--per-process", type=int, default=2, help="sequences (pairs) per process and step")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=1800, help="s per run")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for case in args.cases.split(","):
        for strategy in args.strategies.split(","):
            counts = args.ddp_processes.split(",") if strategy == "ddp" else [args.processes]
            for n in map(int, counts):
                print(f"[sharded] {case} {strategy} x{n} ...", flush=True)
                rows.append(run_one(args, case, strategy, n))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
                if "error" in rows[-1]:
                    print(rows[-1]["error"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    (out / f"sharded-{stamp}{'' if args.shape == 'qwen2.5-0.5b' else '-' + args.shape}.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                          indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
