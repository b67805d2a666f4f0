"""MSE per dimension of every registered codec on i.i.d. N(0, 1) weights, against the rate–distortion bound.

For a memoryless Gaussian source of variance 1, no code of R bits per sample does better than
D(R) = 2^(-2R); the gap 10·log10(MSE / D(R)) in dB is what a codec leaves on the table at its
actual stored rate R (codes plus scales, norms, seeds, ... from Packed.bits_per_weight).
The ideal scalar Lloyd-Max quantizer (no side information, R = b) sits 1.62 / 2.74 / 3.45 / 3.87 dB
above D(R) at 1 / 2 / 3 / 4 bits, tending to 10·log10(√3·π/2) = 4.35 dB at high rate.

Codecs that take `bits` are run at 2, 3, 4 bits (named variants below, defaults otherwise);
fixed formats (ggml types) are listed at their nominal bits (the digit in their name).

The bitshift trellis (`trellis`) is measured apart, on its own sample (`--trellis-rows` rows of
`--cols`; its search costs T·2^L per tile) at each L of `--trellis-L`, for every code, with the
published L = 16 figures (QTIP; exllamav3) beside it: `vs pub dB` = 10·log10(MSE / published MSE).

    .venv/bin/python bench/gaussian_mse.py [--rows 256] [--cols 4096] [--seed 0] [--codecs e8p,e8,d4,nestquant]
                                           [--trellis-L 12,16] [--trellis-rows 64] [--trellis-rows-16 8]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantatlas.quant.codecs import make_codec  # noqa: E402
from quantatlas.quant.config import registry  # noqa: E402
from quantatlas.quant.lloyd_max import codebook  # noqa: E402

BITS = (2, 3, 4)
VARIANTS = {  # extra options per codec that takes bits; unknown codecs run with their defaults
    "uniform": [{"group": 128}, {"group": 128, "clip": "mse"}, {"group": 128, "symmetric": False, "clip": "mse"}],
    "lloyd_max": [{"group": 128, "scale": "rms"}, {"group": 128, "scale": "absmax"}],
    "turbo": [{"group": 128}, {"group": 128, "codebook": "gaussian"}, {"group": 128, "norm_correction": False},
              {"group": 64}, {"group": 256}],
    # lattices (issue 15 part 4); e8p with one scale per row is QuIP#'s setting (one per matrix there)
    "e8p": [{"group": None}, {"group": 128}],
    "e8": [{"group": 128}, {"group": 128, "scale_search": False}],
    "d4": [{"group": 128}, {"group": 128, "scale_search": False}],
    "nestquant": [{"group": 128, "betas": 1}, {"group": 128, "betas": 4}, {"group": 128, "betas": 8}],
}


#: i.i.d. N(0, 1) MSE at 2 / 3 / 4 bits of the L = 16 trellis codes as published
TRELLIS_PUBLISHED = {"1mad": (0.0686, 0.0178, 0.0046), "3inst": (0.0699, 0.0181, 0.0047)}
TRELLIS_CODES = (("1mad", 1), ("3inst", 1), ("hyb", 2), ("gaussian", 1))


def takes_bits(cls) -> bool:
    fields = getattr(cls, "model_fields", None)   # a typed codec config
    return "bits" in fields if fields is not None else "bits" in inspect.signature(cls.__init__).parameters


def trellis_rows(L: int, n_rows: int, cols: int, seed: int) -> list[dict]:
    w = torch.randn(n_rows, cols, generator=torch.Generator().manual_seed(seed + 1000 * L))
    out = []
    for bits in BITS:
        for code, V in TRELLIS_CODES:
            if L >= 16 and code not in TRELLIS_PUBLISHED:
                continue  # at L = 16 on CPU: only the codes with published figures
            r = {**measure("trellis", {"bits": bits, "L": L, "V": V, "code": code}, w), "nominal_bits": bits,
                 "sample": [n_rows, cols]}
            pub = TRELLIS_PUBLISHED.get(code)
            if pub is not None and L == 16:
                r["published_mse"] = pub[bits - 2]
                r["vs_published_db"] = 10 * math.log10(r["mse"] / pub[bits - 2])
            out.append(r)
            print(f"  trellis L={L} {code} {bits} bits: MSE {r['mse']:.5f} ({r['seconds']:.1f} s)", flush=True)
    return out


def nominal_bits(name: str) -> int | None:
    m = re.match(r"i?q(\d)", name)
    return int(m.group(1)) if m else None


def measure(name: str, options: dict, w: torch.Tensor) -> dict:
    codec = make_codec(name, options)
    t = time.perf_counter()
    packed = codec.encode(w)
    w_hat = codec.decode(packed)
    seconds = time.perf_counter() - t
    mse = float(((w_hat.double() - w.double()) ** 2).mean())
    rate = packed.bits_per_weight
    return {"codec": name, "options": options, "bits_per_weight": rate, "mse": mse,
            "gap_db": 10 * math.log10(mse / 2 ** (-2 * rate)), "seconds": seconds}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trellis-L", default="12,16", help="comma-separated L values for the trellis rows ('' skips)")
    ap.add_argument("--trellis-rows", type=int, default=64, help="rows of the trellis sample for L < 16")
    ap.add_argument("--trellis-rows-16", type=int, default=8, help="rows of the trellis sample at L = 16 (CPU)")
    ap.add_argument("--codecs", default="", help="comma-separated codec names to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gaussian_mse.json")
    args = ap.parse_args(argv)

    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(args.seed))
    CODECS = {name: cls for name, cls in registry("codec").items() if name != "trellis"}
    if args.codecs:
        CODECS = {name: cls for name, cls in CODECS.items() if name in args.codecs.split(",")}
    rows: list[dict] = []
    for L in [int(v) for v in args.trellis_L.split(",") if v.strip()]:
        rows += trellis_rows(L, args.trellis_rows_16 if L >= 16 else args.trellis_rows, args.cols, args.seed)
    for bits in BITS:
        ideal = codebook(bits).mse
        rows.append({"codec": "ideal scalar Lloyd-Max", "options": {"bits": bits}, "bits_per_weight": float(bits),
                     "mse": ideal, "gap_db": 10 * math.log10(ideal / 2 ** (-2 * bits)), "seconds": 0.0,
                     "nominal_bits": bits})
        for name, cls in sorted(CODECS.items()):
            if takes_bits(cls):
                for extra in VARIANTS.get(name, [{}]):
                    rows.append({**measure(name, {"bits": bits, **extra}, w), "nominal_bits": bits})
            elif nominal_bits(name) == bits:
                rows.append({**measure(name, {}, w), "nominal_bits": bits})
    for name, cls in sorted(CODECS.items()):  # fixed formats above 4 bits, for reference
        nb = nominal_bits(name)
        if not takes_bits(cls) and (nb is None or nb not in BITS):
            rows.append({**measure(name, {}, w), "nominal_bits": nb})

    print(f"i.i.d. N(0,1), {args.rows}x{args.cols}, seed {args.seed}; gap = 10 log10(MSE / 2^(-2R))")
    print(f"{'bits':>4}  {'codec':<24} {'options':<46} {'R (bpw)':>8} {'MSE':>10} {'gap dB':>7} {'vs pub dB':>9}")
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "bits")
        pub = f"{r['vs_published_db']:+9.3f}" if "vs_published_db" in r else ""
        print(f"{str(r['nominal_bits']):>4}  {r['codec']:<24} {opts:<46} {r['bits_per_weight']:8.4f} "
              f"{r['mse']:10.6f} {r['gap_db']:7.2f} {pub}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "gaussian_mse", "rows": args.rows, "cols": args.cols, "seed": args.seed,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
