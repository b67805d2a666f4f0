"""Throughput of the fast Hadamard transform against a dense matmul by the same (normalised) matrix.

Methods, all computing y = H x / √n for a batch of rows x [rows, n]:
  fast       quantatlas.quant.hadamard.hadamard_transform (one small GEMM per Kronecker factor)
  butterfly  the radix-2 butterfly, log2(n) passes (powers of two only)
  dense      x @ (H/√n)ᵀ with H materialised (n² floats)
Sizes 128 .. 16384 (powers of two) plus the m·2^k widths of real MLPs (11008 = 172·64, 14336 = 28·512).
Each timing is the best of `--repeat` runs after a warm-up; rows are chosen so a call touches
about 2^22 elements (fewer for dense at large n, whose cost grows as n² per row).

    .venv/bin/python bench/fwht_speed.py [--device cpu|cuda] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantatlas.quant.hadamard import fwht_butterfly, hadamard_matrix, hadamard_transform  # noqa: E402

SIZES = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 11008, 14336]


def best_time(fn, device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--elements", type=int, default=1 << 22)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = args.out or Path(__file__).parent / "results" / f"fwht_speed_{device.type}.json"

    rows_out = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), {args.dtype}, threads {torch.get_num_threads()}; throughput in M elements/s")
    print(f"{'n':>6} {'rows':>6} {'fast':>10} {'butterfly':>10} {'dense':>10} {'fast/dense':>10} {'max err':>9}")
    for n in SIZES:
        rows = max(1, args.elements // n)
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(device, dtype)
        h = (hadamard_matrix(n, dtype=torch.float32) / math.sqrt(n)).to(device, dtype)
        dense_rows = max(8, min(rows, (1 << 33) // (n * n)))       # keep a dense call near 2^34 flops
        xd = x[:dense_rows]
        r = {"n": n, "rows": rows, "dense_rows": dense_rows}
        r["fast"] = rows * n / best_time(lambda: hadamard_transform(x), device, args.repeat) / 1e6
        if n & (n - 1) == 0:
            r["butterfly"] = rows * n / best_time(lambda: fwht_butterfly(x), device, args.repeat) / 1e6
        r["dense"] = dense_rows * n / best_time(lambda: xd @ h.T, device, args.repeat) / 1e6
        r["max_err"] = float((hadamard_transform(xd).float() - (xd @ h.T).float()).abs().max())
        rows_out.append(r)
        bf = f"{r['butterfly']:10.1f}" if "butterfly" in r else f"{'-':>10}"
        print(f"{n:6d} {rows:6d} {r['fast']:10.1f} {bf} {r['dense']:10.1f} {r['fast'] / r['dense']:10.1f} "
              f"{r['max_err']:9.2e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "fwht_speed", "device": str(device), "dtype": args.dtype,
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "unit": "M elements/s", "results": rows_out}, indent=1))
    print(f"wrote {out}")
    return rows_out


if __name__ == "__main__":
    main()
