"""Speed of the bitshift trellis codec: weights per second encoded (tail-biting Viterbi: two passes)
and decoded (unpack the bit string, states, codebook, scales), on CPU and on CUDA when present.

Encode work is T·2^L per tile and per pass, so the encode sample shrinks as L grows
(`--weights` at L = 12, divided by 2^(L-12)); decode is a table lookup and runs on `--decode-rows` × 4096.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trellis_speed.py [--L 12,14,16] [--weights 65536]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantatlas.quant.codecs import make_codec  # noqa: E402

COLS = 4096


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, L: int, bits: int, code: str, V: int, weights: int, decode_rows: int) -> dict:
    codec = make_codec("trellis", {"bits": bits, "L": L, "V": V, "code": code})
    rows = max(1, weights // COLS)
    w = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(0)).to(device)
    codec.encode(w[:1, :codec.T])                      # warm-up: tables on the device
    _sync(device)
    t = time.perf_counter()
    packed = codec.encode(w)
    _sync(device)
    enc = time.perf_counter() - t
    # decode throughput on a larger matrix of valid paths (decode does not search)
    big = codec.pack(torch.zeros(decode_rows, COLS // V, dtype=torch.int32),
                     [codec.fit(torch.ones(decode_rows, COLS))])
    big.data = {k: v.to(device) for k, v in big.data.items()}
    codec.decode(big)
    _sync(device)
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        codec.decode(big)
    _sync(device)
    dec = (time.perf_counter() - t) / reps
    return {"device": str(device), "L": L, "bits": bits, "code": code, "V": V, "encoded_weights": rows * COLS,
            "encode_seconds": enc, "encode_weights_per_s": rows * COLS / enc,
            "decode_weights_per_s": decode_rows * COLS / dec, "bits_per_weight": packed.bits_per_weight}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--L", default="12,14,16")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--weights", type=int, default=1 << 16, help="weights encoded at L = 12 (fewer at larger L)")
    ap.add_argument("--decode-rows", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trellis_speed.json")
    args = ap.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for L in [int(v) for v in args.L.split(",")]:
            weights = args.weights if device.type == "cuda" else max(COLS, args.weights >> max(0, L - 12))
            for code, V in (("1mad", 1), ("hyb", 2)):
                r = measure(device, L, args.bits, code, V, weights * (16 if device.type == "cuda" else 1),
                            args.decode_rows)
                results.append(r)
                print(f"{r['device']:<6} L={L:<2} K={args.bits} {code:<5} V={V}  encode {r['encode_weights_per_s']:>12,.0f} "
                      f"w/s ({r['encoded_weights']} weights, {r['encode_seconds']:.1f} s)   "
                      f"decode {r['decode_weights_per_s']:>14,.0f} w/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "trellis_speed", "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                                    "machine": platform.machine(), "processor": platform.processor(),
                                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
