"""The machine's dense matmul throughput, the denominator of MFU (runs in the alignkit venv).

Square ``n x n @ n x n`` products, ``2 n^3`` FLOPs each, for several ``n``; the best time of
``repeats`` runs per size, after a warm-up run; the peak is the highest rate over sizes. bf16 is a
plain bf16 matmul (what autocast runs for ``nn.Linear``); on a CPU without bf16 matrix instructions
it is measured at n = 256 only and ``bf16_native`` is false.

Usage: python bench/peak.py [--sizes 1024,2048] [--repeats 10]  -> prints BENCH_RESULT {json}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, set_threads  # noqa: E402


def best_rate(n: int, dtype, repeats: int) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main():
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    threads = set_threads()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"threads": threads, "sizes": sizes, "repeats": args.repeats}
    from alignkit.engine.training import cpu_has_fast_bf16

    # Without bf16 matrix instructions PyTorch emulates bf16 products (~100x slower than fp32 on an
    # AVX2-only CPU: 2048^3 would take minutes per product); one small size records how slow.
    native = torch.cuda.is_available() or cpu_has_fast_bf16()
    result["bf16_native"] = native
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ns = sizes if name == "fp32" or native else [256]
        rates = {n: best_rate(n, dtype, args.repeats if ns is sizes else 2) for n in ns}
        result[f"{name}_by_size_gflops"] = {str(n): r / 1e9 for n, r in rates.items()}
        result[f"{name}_peak_flops"] = max(rates.values())
    emit(result)


if __name__ == "__main__":
    main()
