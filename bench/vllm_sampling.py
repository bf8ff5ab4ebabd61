"""Sampling on vLLM, side by side in one process: ``python bench/vllm_sampling.py`` (~6-9 min).

(a) ``wrapper``: alignkit's ``vllm`` backend (``engine.vllm_engine.sample_vllm``: weight-version
    check, request building, Rollout assembly) against raw ``vllm.LLM.generate`` with the same
    per-request ``SamplingParams`` on the same engine and token-id prompts; ratio = raw seconds /
    wrapper seconds (goal >= 0.9).
(b) ``engines``: vLLM (through the backend) against alignkit's own KV-cache decoder (``hf``
    backend, ``generation.generate``) at the demo model, the 40M GPT-2 and a Qwen2.5-0.5B shape
    (random init from a config, nothing downloaded), tokens/s, alternating rounds after a warm-up
    call each. vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so it computes
    with this process's torch threads (both cores here): no worker is pinned
    (``VLLM_CPU_OMP_THREADS_BIND`` only binds the multi-process engine's worker).
(c)+(d) ``grpo``: ``alignkit ppo`` (GRPO / RLOO, k=4, 8 prompts, 64 tokens: the bench's ``grpo``
    and ``rloo`` cases) with ``rollout.sampling.engine`` hf and vllm, seconds per iteration after
    the first (which starts the engine), and the weight syncs' share of a vLLM iteration.

Models as ``bench/prepare.py`` builds them (seed 0; tokenizers trained on the sentiment corpus);
prompts: the sentiment task's train prompts. ``--only wrapper,engines,grpo`` picks parts;
``--rounds``; ``--skip-05b``. Prints a table; ``--out FILE.json`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0)


def tokenizer_for(vocab: int):
    from alignkit.engine.tokenizer import train_tokenizer
    from alignkit.tasks import get_task

    return train_tokenizer(get_task("sentiment").corpus(2000, seed=0), vocab_size=vocab)


def build(name: str):
    """(model, tokenizer) of a bench model: prepare.py's two, or the Qwen2.5-0.5B shape."""
    from prepare import MODELS, build_model

    if name == "qwen2.5-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = tokenizer_for(1024)
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
        return model.eval(), tok
    tok = tokenizer_for(MODELS[name][1])
    return build_model(name, tok).eval(), tok


def prompts(tok, n: int) -> list[list[int]]:
    from alignkit.data.formats import encode_prompt
    from alignkit.tasks import get_task

    texts = get_task("sentiment").prompts("train")
    return [encode_prompt(texts[i % len(texts)], tok) for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def part_engines(names, rounds: int, rows_new: tuple[int, int], out: dict) -> None:
    from alignkit.engine import vllm_engine
    from alignkit.engine.generation import generate
    from alignkit.engine.sampling import SamplingConfig

    for name in names:
        model, tok = build(name)
        small = name == "qwen2.5-0.5b"
        rows, new = (4, 8) if small else rows_new
        ids = prompts(tok, rows)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        hf_cfg = SamplingConfig(max_new_tokens=new)
        vl_cfg = SamplingConfig(max_new_tokens=new, engine="vllm", vllm_kv_cache_gib=1.0)
        seeds = list(range(rows))
        calls = {"hf": lambda: generate(model, ids, hf_cfg, eos_token_id=eos, pad_token_id=pad, seeds=seeds),
                 "vllm": lambda: vllm_engine.sample_vllm(model, ids, vl_cfg, eos_token_id=eos,
                                                         pad_token_id=pad, seeds=seeds)}
        start = timed(calls["vllm"])          # engine start + first draw
        for fn in calls.values():
            fn()                               # warm-up
        # tokens/s of each call (rows stop at EOS: each side's own count of sampled tokens)
        rates = {k: [] for k in calls}
        for r in range(1 if small else rounds):
            for k in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
                start_t = time.perf_counter()
                rollout = calls[k]()
                rates[k].append(int(rollout.response_mask.sum()) / (time.perf_counter() - start_t))
        res = {k: statistics.median(v) for k, v in rates.items()}
        out.setdefault("engines", {})[name] = {
            "rows": rows, "new_tokens": new, "hf_tok_s": res["hf"], "vllm_tok_s": res["vllm"],
            "vllm_over_hf": res["vllm"] / res["hf"], "engine_start_s": start,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "rounds": len(rates["hf"])}
        print(f"[engines] {name}: hf {res['hf']:.0f} tok/s, vllm {res['vllm']:.0f} tok/s, "
              f"vllm/hf {res['vllm'] / res['hf']:.2f} (engine start + first call {start:.1f} s)",
              flush=True)
        if name == "gpt2-40m" and "wrapper" in out.get("_parts", ()):
            part_wrapper(model, ids, vl_cfg, eos, pad, seeds, rounds, out)
        vllm_engine.shutdown()
        del model, calls


def part_wrapper(model, ids, cfg, eos, pad, seeds, rounds: int, out: dict) -> None:
    """(a): the backend against raw LLM.generate on the same engine, requests and prompts."""
    import vllm

    from alignkit.engine import vllm_engine

    engine = vllm_engine.engine_for(model, cfg.vllm_kv_cache_gib)
    params = [vllm.SamplingParams(n=1, seed=s, temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, max_tokens=cfg.max_new_tokens, logprobs=0,
                                  stop_token_ids=[eos], detokenize=False) for s in seeds]
    reqs = [vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in ids]
    calls = {"raw": lambda: engine.llm.generate(reqs, params, use_tqdm=False),
             "alignkit": lambda: vllm_engine.sample_vllm(model, ids, cfg, eos_token_id=eos,
                                                         pad_token_id=pad, seeds=seeds)}
    times = {k: [] for k in calls}
    for r in range(2 * rounds):
        for k in (("raw", "alignkit") if r % 2 == 0 else ("alignkit", "raw")):
            times[k].append(timed(calls[k]))
    raw, ours = statistics.median(times["raw"]), statistics.median(times["alignkit"])
    out["wrapper"] = {"model": "gpt2-40m", "raw_s": raw, "alignkit_s": ours, "ratio": raw / ours}
    print(f"[wrapper] gpt2-40m: raw LLM.generate {raw:.3f} s, alignkit backend {ours:.3f} s, "
          f"ratio {raw / ours:.3f} (goal >= 0.9)", flush=True)


def part_grpo(cases, iterations: int, out: dict) -> None:
    from alignkit.config import load_config
    from alignkit.engine import vllm_engine
    from alignkit.stages import ppo
    from alignkit.tasks import get_task
    from alignkit.tracking import read_metrics

    syncs: list[float] = []
    original = vllm_engine.VLLMEngine.sync

    def timed_sync(self, model):
        start = time.perf_counter()
        pushed = original(self, model)
        if pushed:
            syncs.append(time.perf_counter() - start)
        return pushed

    vllm_engine.VLLMEngine.sync = timed_sync
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    texts = get_task("sentiment").prompts("train")[:64]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    for name, algo in cases:
        folder = work / name
        if not folder.exists():
            model, tok = build(name)
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            del model
        for engine in ("hf", "vllm"):
            syncs.clear()
            run = work / f"{name}-{algo}-{engine}"
            beta = "0.04" if algo == "grpo" else "0.05"
            cfg = load_config(ppo.Config, None, [
                f"model={folder}", "reward=python:common:reward_of_texts", f"out_dir={run}",
                f"rollout.prompts={work / 'prompts.jsonl'}", "rollout.prompts_per_iteration=8",
                "rollout.samples_per_prompt=4", "rollout.batch_size=32",
                "rollout.sampling.max_new_tokens=64", f"rollout.sampling.engine={engine}",
                f"ppo.algo={algo}", "ppo.epochs=1", "ppo.minibatch_size=32",
                "ppo.micro_batch_size=32", f"kl.beta={beta}", f"iterations={iterations}",
                "report_to=none", "eval.num_prompts=0", "eval.initial=false"])
            ppo.main(cfg)
            rows = read_metrics(run)[1:]         # the first iteration starts the engine
            it = statistics.median(r["iteration_s"] for r in rows)
            sync = statistics.median(syncs[1:]) if len(syncs) > 1 else float("nan")
            rec = {"iteration_s": it, "items_per_s": 32 / it,
                   "logprob_gap_max": max(r["logprob_gap_max"] for r in rows)}
            if engine == "vllm":
                rec.update(sync_s=sync, sync_share=sync / it)
            out.setdefault("grpo", {})[f"{name}/{algo}/{engine}"] = rec
            extra = (f", weight sync {sync * 1000:.0f} ms = {100 * sync / it:.1f}% of an iteration"
                     if engine == "vllm" else "")
            print(f"[grpo] {name} {algo} {engine}: {it:.2f} s/iteration ({32 / it:.1f} "
                  f"completions/s), gap max {rec['logprob_gap_max']:.1e}{extra}", flush=True)
            vllm_engine.shutdown()
    vllm_engine.VLLMEngine.sync = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="wrapper,engines,grpo")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--skip-05b", action="store_true")
    ap.add_argument("--rows", type=int, default=64, help="prompts per call (0.5B: 4)")
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens per row (0.5B: 8)")
    ap.add_argument("--models", default="llama-demo,gpt2-40m,qwen2.5-0.5b")
    ap.add_argument("--grpo-cases", default="gpt2-40m:grpo,llama-demo:grpo,llama-demo:rloo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = args.only.split(",")
    out: dict = {"_parts": parts, "threads": torch.get_num_threads(),
                 "machine": os.uname().machine, "cpus": os.cpu_count()}
    begin = time.perf_counter()
    if "engines" in parts or "wrapper" in parts:
        names = ([m for m in args.models.split(",") if not (args.skip_05b and "0.5b" in m)]
                 if "engines" in parts else ["gpt2-40m"])
        part_engines(names, args.rounds, (args.rows, args.new_tokens), out)
    if "grpo" in parts:
        part_grpo([tuple(c.split(":")) for c in args.grpo_cases.split(",")], args.iterations, out)
    out["wall_s"] = time.perf_counter() - begin
    print(f"total {out['wall_s']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
