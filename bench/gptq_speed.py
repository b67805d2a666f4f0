"""GPTQ speed: our solver against the IST-DASLab reference loop, same W and H, same settings.

    python bench/gptq_speed.py [--device cpu|cuda] [--shapes 1024x1024,4096x4096,11008x4096]
                               [--modes gptq,act_order,gptaq] [--mode-shape 4096x4096] [--repeats 3]

Settings (issue 18): uniform 4 bits asymmetric, groups of 128, block 128, damp 0.01, one CPU
thread (`--threads 1`, torch.set_num_threads). W = 0.02·randn, H a correlated Hessian (AR(1)
ρ=0.9, a rank-32 part, log-normal channel scales).

The reference (`reference_gptq` below) is a re-implementation of `GPTQ.fasterquant` from
IST-DASLab/gptq (gptq.py) with its `Quantizer` (quant.py, perchannel, sym=False, minmax):
dead columns zeroed, act order by descending diag(H), damp·mean(diag H) on the diagonal,
Hinv = chol(chol_inverse(chol(H)))ᵀ, then per block of 128 columns: per column the group's
scale/zero refitted at the group's first column on W[:, i:i+g] (static_groups: all fitted up
front on the original W), the fake-quantize clamp(round(w/s)+z, 0, maxq), the loss and error
of the column, the rank-1 update of the rest of the block, and one matmul per block for the
columns after it. GPTAQ mode adds the GPTAQ paper's terms to that loop (P = ((ΔXXᵀ Hinvᵀ) ⊙
strict upper) Hinv; w ⊗ P[i, i:] inside the block, Wpre @ P[block, rest] across blocks, with w
and Wpre the pre-rounding values as in the paper and our solver). Our codec stores
fp16 scales and the reference keeps fp32 ones, so the proxy loss is also given for the
reference with its scales rounded to fp16 (untimed; `proxy_ratio_vs_fp16_scales`).

Each run is a fresh process (peak memory is its own): on CPU the process's peak RSS
(ru_maxrss) and the RSS just before the solver call, on CUDA torch.cuda.max_memory_allocated
above the inputs. Runs alternate reference / ours, `--repeats` times, and each figure is the
minimum over repeats (the machine may be shared: alternating spreads load over both). The
proxy loss tr((Ŵ-W) H (Ŵ-W)ᵀ) is computed once per (mode, shape, solver), outside the timing;
ours runs with losses=False, as the solver does in a quantization run (the reference's per-column
Losses bookkeeping stays in its loop), and its timing includes packing the codes.
`uptime` is recorded before and after. Writes bench/results/gptq_speed.json.
"""
from __future__ import annotations

import argparse
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


def cross_term(H: torch.Tensor, seed: int) -> torch.Tensor:
    """A GPTAQ cross term (2/N)(X̃ - X)Xᵀ of plausible size: 0.05 · G H with G random, ‖G‖ ~ 1."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(H.shape[0], H.shape[0], generator=g) / H.shape[0] ** 0.5
    return 0.05 * (G.to(H.device) @ H)


# -- the reference: IST-DASLab gptq.py fasterquant + quant.py Quantizer (asymmetric, minmax) ----------
def _find_params(x: torch.Tensor, maxq: int, fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    zero = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero)
    xmax = torch.maximum(x.max(1).values, zero)
    both = (xmin == 0) & (xmax == 0)
    xmin[both] = -1
    xmax[both] = +1
    scale = (xmax - xmin) / maxq
    if fp16:   # not in the reference: its scales as they are stored (fp16), as our codec stores them
        scale = scale.half().float()
    zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1)


def _fake_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, *, bits: int = 4, groupsize: int = 128, blocksize: int = 128,
                   percdamp: float = 0.01, actorder: bool = False, static_groups: bool = False,
                   dXXT: torch.Tensor | None = None, fp16_scales: bool = False) -> torch.Tensor:
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    maxq = 2 ** bits - 1
    scale, zero = _find_params(W, maxq, fp16_scales)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if static_groups:
        groups = [_find_params(W[:, i:i + groupsize], maxq, fp16_scales) for i in range(0, cols, groupsize)]
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)
        if dXXT is not None:
            dXXT = dXXT[perm][:, perm]
    Losses = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    P = None
    if dXXT is not None:
        P = torch.triu(dXXT @ Hinv.T, diagonal=1) @ Hinv
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        P1 = None if P is None else P[i1:i2, i1:i2]
        Wpre1 = None if P is None else torch.zeros_like(W1)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = _find_params(W[:, (i1 + i):(i1 + i + groupsize)], maxq, fp16_scales)
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[int(idx) // groupsize]
            q = _fake_quantize(w.unsqueeze(1), scale, zero, maxq).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            if P1 is not None:   # before the error update, which turns the view w into q (P1[i, i] = 0)
                Wpre1[:, i] = w
                W1[:, i:] += w.unsqueeze(1).matmul(P1[i, i:].unsqueeze(0))
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        if P is not None:
            W[:, i2:] += Wpre1.matmul(P[i1:i2, i2:])   # the pre-rounding block
    if actorder:
        Q = Q[:, invperm]
    return Q


# -- one measurement, in a fresh process ------------------------------------------------------------
def run_case(case: dict) -> dict:
    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.solvers import gptq

    dev = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    rows, cols, mode = case["rows"], case["cols"], case["mode"]
    W = (0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))).to(dev)
    H = correlated_hessian(cols, 0, dev)
    C = cross_term(H, 2) if mode == "gptaq" else None
    act = mode == "act_order"
    codec = make_codec("uniform", {"bits": case["bits"], "group": case["group"], "symmetric": False})
    _sync(dev)
    rss_before = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    if case["solver"] == "ours":
        W_hat, packed, info = gptq(W, H, codec, block_size=case["block_size"], act_order=act, static_groups=act,
                                   H_cross=C, losses=False, overwrite_h=True)   # as the GPTQ solver calls it in a run
        H = correlated_hessian(cols, 0, dev)   # (overwritten by the factor) again for the proxy loss
    else:
        W_hat = reference_gptq(W, H, bits=case["bits"], groupsize=case["group"], blocksize=case["block_size"],
                               actorder=act, static_groups=act, dXXT=C)
    _sync(dev)
    out = {"seconds": time.perf_counter() - t0}
    if dev.type == "cuda":
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2 ** 20
    else:
        out["peak_mib"], out["rss_before_mib"] = _rss_mib(), rss_before
    if case["proxy"]:
        out["proxy_loss"] = _proxy(W_hat, W, H)
        if case["solver"] == "reference":   # untimed: the reference with its scales rounded to fp16
            W16 = reference_gptq(W, H, bits=case["bits"], groupsize=case["group"], blocksize=case["block_size"],
                                 actorder=act, static_groups=act, dXXT=C, fp16_scales=True)
            out["proxy_loss_fp16_scales"] = _proxy(W16, W, H)
    return out


def _proxy(W_hat, W, H) -> float:
    D = W_hat.float() - W
    return float(((D @ H) * D).sum(dtype=torch.float64))


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


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def shape(s: str) -> tuple[int, int]:
    r, c = s.lower().split("x")
    return int(r), int(c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="1024x1024,4096x4096,11008x4096", help="plain GPTQ shapes, rows x cols")
    ap.add_argument("--modes", default="gptq,act_order,gptaq", help="gptq (at --shapes), act_order, gptaq")
    ap.add_argument("--mode-shape", default="4096x4096", help="shape for the act_order and gptaq modes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/gptq_speed.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_case(json.loads(a.one))))
        return

    common = {"device": a.device, "bits": a.bits, "group": a.group, "block_size": a.block_size, "threads": a.threads}
    cases = []
    modes = a.modes.split(",")
    if "gptq" in modes:
        cases += [("gptq", *shape(s)) for s in a.shapes.split(",")]
    cases += [(m, *shape(a.mode_shape)) for m in modes if m != "gptq"]
    load_before = uptime()
    results = []
    for mode, rows, cols in cases:
        runs: dict[str, list[dict]] = {"reference": [], "ours": []}
        for rep in range(a.repeats):
            for solver in ("reference", "ours"):   # alternate, so load hits both alike
                runs[solver].append(in_child({**common, "mode": mode, "rows": rows, "cols": cols,
                                              "solver": solver, "proxy": rep == 0}))
        row = {"mode": mode, "shape": f"{rows}x{cols}"}
        for solver, rs in runs.items():
            row[f"{solver}_s"] = min(r["seconds"] for r in rs)
            row[f"{solver}_all_s"] = [round(r["seconds"], 3) for r in rs]
            row[f"{solver}_peak_mib"] = min(r["peak_mib"] for r in rs)
            if "rss_before_mib" in rs[0]:
                row[f"{solver}_rss_before_mib"] = min(r["rss_before_mib"] for r in rs)
            row[f"{solver}_proxy"] = rs[0]["proxy_loss"]
        row["speedup"] = row["reference_s"] / row["ours_s"]
        row["proxy_ratio"] = row["ours_proxy"] / row["reference_proxy"]
        row["reference_fp16_scales_proxy"] = runs["reference"][0]["proxy_loss_fp16_scales"]
        row["proxy_ratio_vs_fp16_scales"] = row["ours_proxy"] / row["reference_fp16_scales_proxy"]
        results.append(row)
        print(f"{mode:>9} {row['shape']:>10}  ref {row['reference_s']:7.2f}s  ours {row['ours_s']:7.2f}s  "
              f"speedup {row['speedup']:5.2f}x  proxy ratio {row['proxy_ratio']:.5f} "
              f"(vs fp16-scale ref {row['proxy_ratio_vs_fp16_scales']:.5f})  peak MiB ref "
              f"{row['reference_peak_mib']:.0f} ours {row['ours_peak_mib']:.0f}", flush=True)
    load_after = uptime()

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    peak_what = ("cuda max_memory_allocated above the inputs" if a.device.startswith("cuda") else
                 "process peak RSS (ru_maxrss; rss_before = peak before the solver call: interpreter, torch, W, H)")
    print(f"\nuniform {a.bits} bits asymmetric g{a.group}, block {a.block_size}, {device_name}, "
          f"{a.threads or torch.get_num_threads()} thread(s), min of {a.repeats} alternating runs each")
    print(f"{'mode':>9} {'rows x cols':>12} {'ref s':>8} {'ours s':>8} {'speedup':>8} {'proxy ratio':>12} "
          f"{'vs fp16 ref':>12} {'ref peak':>9} {'ours peak':>10}  (MiB, {peak_what})")
    for r in results:
        print(f"{r['mode']:>9} {r['shape']:>12} {r['reference_s']:8.2f} {r['ours_s']:8.2f} {r['speedup']:7.2f}x "
              f"{r['proxy_ratio']:12.5f} {r['proxy_ratio_vs_fp16_scales']:12.5f} {r['reference_peak_mib']:9.0f} "
              f"{r['ours_peak_mib']:10.0f}")
    print(f"uptime before: {load_before}\nuptime after:  {load_after}")
    res = {"device": a.device, "device_name": device_name, "torch": torch.__version__,
           "threads": a.threads or torch.get_num_threads(),
           "codec": {"uniform": {"bits": a.bits, "group": a.group, "symmetric": False}},
           "block_size": a.block_size, "repeats": a.repeats, "timing": "min over alternating fresh-process runs",
           "peak_memory": peak_what, "uptime_before": load_before, "uptime_after": load_after,
           "results": results}
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
