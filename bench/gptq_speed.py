"""GPTQ speed: seconds to quantize one layer (Hessian given) at 4 bits g128 uniform, against the
direct unbatched OBS implementation of tests/test_gptq.py, and peak memory.

    python bench/gptq_speed.py [--device cpu|cuda] [--shapes 4096x4096,11008x4096] [--direct 1024x1024]

Each measurement runs in a fresh process, so peak memory is that case's own: on CUDA
torch.cuda.max_memory_allocated, on CPU the process's peak RSS (ru_maxrss, which includes
the interpreter and torch, ~0.3 GiB; the idle baseline is printed). The direct OBS costs
O(cols³ + rows·cols²) and is far too slow at layer size on a CPU, so it is timed at
--direct (and GPTQ beside it, for a same-size ratio) and extrapolated to the layer
shapes by that cost; the table says which figures are extrapolated.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def correlated_hessian(cols: int, seed: int, device) -> torch.Tensor:
    """A random correlated H: AR(1) correlation ρ=0.9 between neighbouring channels, a random
    rank-32 component, log-normal channel scales (outlier channels), as (2/N) X Xᵀ would look."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(cols, dtype=torch.float32)
    corr = 0.9 ** (idx[:, None] - idx[None, :]).abs()
    B = torch.randn(cols, 32, generator=g) / 32 ** 0.5
    scale = torch.exp(0.8 * torch.randn(cols, generator=g))
    H = (corr + B @ B.T) * scale[:, None] * scale[None, :]
    return H.to(device)


def run_case(case: dict) -> dict:
    """One measurement, in this (fresh) process."""
    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.solvers import gptq

    dev = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    rows, cols = case["rows"], case["cols"]
    W = (0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))).to(dev)
    H = correlated_hessian(cols, 0, dev)
    codec = make_codec("uniform", {"bits": case["bits"], "group": case["group"]})
    baseline_rss = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    out = {"rows": rows, "cols": cols, "kind": case["kind"]}
    if case["kind"] == "gptq":
        t0 = time.perf_counter()
        _, packed, info = gptq(W, H, codec, block_size=case["block_size"])
        _sync(dev)
        out.update(seconds=time.perf_counter() - t0, proxy_loss=info["proxy_loss"],
                   bits_per_weight=packed.bits_per_weight)
    else:
        direct_obs = _load_direct()
        t0 = time.perf_counter()
        direct_obs(W, H, codec, dtype=torch.float32)
        _sync(dev)
        out["seconds"] = time.perf_counter() - t0
    if dev.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
        out["peak_what"] = "cuda max_memory_allocated above the inputs"
    else:
        out["peak_mib"] = _rss_mib()
        out["baseline_rss_mib"] = baseline_rss
        out["peak_what"] = "process peak RSS"
    return out


def _load_direct():
    spec = importlib.util.spec_from_file_location("test_gptq", ROOT / "tests" / "test_gptq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.direct_obs


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def in_child(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cost(rows: int, cols: int) -> float:
    return cols ** 3 + rows * cols ** 2


def shape(s: str) -> tuple[int, int]:
    r, c = s.lower().split("x")
    return int(r), int(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="layer shapes rows x cols")
    ap.add_argument("--direct", default="1024x1024", help="shape at which the direct OBS is timed")
    ap.add_argument("--direct-at-layer", action="store_true", help="also time the direct OBS at the layer shapes")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/gptq_speed.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_case(json.loads(a.one))))
        return

    common = {"device": a.device, "bits": a.bits, "group": a.group, "block_size": a.block_size, "threads": a.threads}
    dr, dc = shape(a.direct)
    small_direct = in_child({**common, "kind": "direct", "rows": dr, "cols": dc})
    small_gptq = in_child({**common, "kind": "gptq", "rows": dr, "cols": dc})
    rows_out = [{"shape": f"{dr}x{dc}", "gptq_s": small_gptq["seconds"], "direct_s": small_direct["seconds"],
                 "direct_extrapolated": False, "speedup": small_direct["seconds"] / small_gptq["seconds"],
                 "gptq_peak_mib": small_gptq["peak_mib"], "direct_peak_mib": small_direct["peak_mib"],
                 "proxy_loss": small_gptq["proxy_loss"], "bits_per_weight": small_gptq["bits_per_weight"]}]
    for s in a.shapes.split(","):
        r, c = shape(s)
        res = in_child({**common, "kind": "gptq", "rows": r, "cols": c})
        if a.direct_at_layer:
            d = in_child({**common, "kind": "direct", "rows": r, "cols": c})
            direct_s, extrapolated, direct_peak = d["seconds"], False, d["peak_mib"]
        else:
            direct_s, extrapolated, direct_peak = small_direct["seconds"] * cost(r, c) / cost(dr, dc), True, None
        rows_out.append({"shape": f"{r}x{c}", "gptq_s": res["seconds"], "direct_s": direct_s,
                         "direct_extrapolated": extrapolated, "speedup": direct_s / res["seconds"],
                         "gptq_peak_mib": res["peak_mib"], "direct_peak_mib": direct_peak,
                         "proxy_loss": res["proxy_loss"], "bits_per_weight": res["bits_per_weight"]})

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"GPTQ, uniform {a.bits} bits g{a.group}, block_size {a.block_size}, on {device_name} "
          f"({torch.get_num_threads() if not a.threads else a.threads} threads); peak memory: "
          f"{small_gptq['peak_what']}" + (f" (idle baseline {small_gptq['baseline_rss_mib']:.0f} MiB)"
                                          if a.device == "cpu" else ""))
    print(f"{'rows x cols':>12} {'gptq s':>9} {'direct s':>10} {'speedup':>8} {'gptq peak MiB':>14} {'bpw':>6}")
    for row in rows_out:
        star = "*" if row["direct_extrapolated"] else " "
        print(f"{row['shape']:>12} {row['gptq_s']:9.2f} {row['direct_s']:9.1f}{star} {row['speedup']:8.1f} "
              f"{row['gptq_peak_mib']:14.0f} {row['bits_per_weight']:6.3f}")
    if any(r["direct_extrapolated"] for r in rows_out):
        print(f"* direct OBS extrapolated from its {dr}x{dc} time by its cost cols³ + rows·cols²")
    res = {"device": a.device, "device_name": device_name, "torch": torch.__version__,
           "threads": a.threads or torch.get_num_threads(), "codec": {"uniform": {"bits": a.bits, "group": a.group}},
           "block_size": a.block_size, "direct_measured_at": f"{dr}x{dc}", "results": rows_out}
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
