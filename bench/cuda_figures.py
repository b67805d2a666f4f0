"""CUDA figures (issue 18 part 4): GPTQ seconds per layer, full-evaluation throughput, and the time to
quantize a ~1 B random model end to end with GPTQ, on one device.

    .venv/bin/python bench/cuda_figures.py [--device cuda] [--layers 22] [--repeats 3] [--out PATH]
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/cuda_figures.py --device cpu --layers 2 --quick \
        --out /tmp/cuda_figures_dry.json      # dry run of the script's logic on a machine without a GPU

(a) `gptq`: `quantatlas.quant.solvers.gptq.gptq` on a 4096x4096 and an 11008x4096 layer (W = 0.02·randn,
    H = (2/N) XᵀX from N = 4096 random rows X with log-normal channel scales), uniform 4-bit asymmetric
    g128 as in bench/gptq_speed.py (issue 18's setting), losses=False and the Hessian handed over, as
    the solver runs inside a quantization run; codes packed inside the timing. Median of `--repeats`
    after one untimed warm-up (CUDA context, cuBLAS/cuSOLVER handles), torch.cuda.synchronize around.
(b) `eval`: the embedded reference model on the default eval set (data.eval: 65536 tokens, ctx 512, the
    second half of each window scored, batch 8): `measure.evaluate` (forward passes + per-token KLD
    against the cached reference log-probs) then `kld_statistics`, as a run evaluates an arm; tokens/s
    counts every token fed (windows × ctx) and, apart, the scored ones. The reference pass that fills
    the cache is timed once apart (a temporary cache, so it is really computed).
(c) `e2e_1b`: bench/peak_memory.py's random Llama in TinyLlama's shape (`--layers 22`: 1.10 B params,
    built once as an fp16 HF folder under $QUANTATLAS_BENCH_DIR or /tmp/quantatlas-bench), loaded in
    fp32 onto the device (no layer streaming: streaming keeps layers on the CPU), then
    `quantize_model` with GPTQ uniform 4-bit g128 (symmetric, the codec's default, as peak_memory.py)
    on random calibration tokens (data.calib's default 64 × 512): capture, Hessians, solves and packing,
    layer by layer. Load seconds are given apart.

`--quick` shrinks (a) to 512x512 / 1376x512 (N 1024), (b) to 8192 tokens and (c)'s calibration to
4 × 128, so a CPU dry run finishes in a couple of minutes. Writes bench/results/cuda_figures.json
unless `--out` says otherwise (a dry run should not overwrite the device's figures).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, result) of fn() with the device's queue drained on both sides (CUDA calls return early)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def gptq_layer(rows: int, cols: int, n: int, repeats: int, device: torch.device) -> dict:
    from quantatlas.quant.codecs import make_codec
    from quantatlas.quant.solvers.gptq import gptq

    g = torch.Generator().manual_seed(0)
    W = (0.02 * torch.randn(rows, cols, generator=g)).to(device)
    X = (torch.randn(n, cols, generator=g) * torch.exp(0.8 * torch.randn(cols, generator=g))).to(device)
    H = 2 / n * X.T @ X
    del X
    codec = make_codec("uniform", {"bits": 4, "group": 128, "symmetric": False})
    # H.clone() per call: the solver may factor in H's memory (overwrite_h), as it does in a run
    run = lambda: gptq(W, H.clone(), codec, losses=False, overwrite_h=True)  # noqa: E731
    run()  # warm-up, untimed
    secs = [timed(run, device)[0] for _ in range(repeats)]
    return {"shape": f"{rows}x{cols}", "calib_rows": n, "seconds": statistics.median(secs), "all_seconds": secs}


def eval_throughput(tokens: int, repeats: int, device: torch.device) -> dict:
    from quantatlas.eval.kld import kld_statistics
    from quantatlas.eval.windows import make_eval_set, reference_logprobs
    from quantatlas.models import load_model
    from quantatlas.measure import evaluate
    from quantatlas.spec import EvalData

    ev = EvalData(tokens=tokens)
    lm = load_model("reference", device=str(device))
    es = make_eval_set(lm.text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
    ref_s, ref = timed(lambda: reference_logprobs(lm.model, lm.model_hash, es, device, ev.batch), device)
    full = lambda: kld_statistics(evaluate(lm.model, es, ref, device, ev.batch))  # noqa: E731
    full()  # warm-up, untimed
    secs = [timed(full, device)[0] for _ in range(repeats)]
    s = statistics.median(secs)
    fed = es.windows.numel()
    return {"model": "reference", "eval_tokens": fed, "scored_tokens": es.n_scored, "ctx": ev.ctx, "batch": ev.batch,
            "seconds": s, "all_seconds": secs, "tokens_per_s": fed / s, "scored_tokens_per_s": es.n_scored / s,
            "reference_pass_seconds": ref_s}


def e2e_quantize(layers: int, samples: int, seq_len: int, bench_dir: Path, device: torch.device) -> dict:
    from quantatlas.models import load_model
    from quantatlas.quant.quantize import quantize_model
    from quantatlas.quant.recipe import build_recipe
    from quantatlas.spec import Arm

    # peak_memory.py's builder, by import (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("peak_memory", ROOT / "bench" / "peak_memory.py")
    peak_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak_memory)
    folder = peak_memory.build(bench_dir / f"llama-random-{layers}l", layers)
    load_s, lm = timed(lambda: load_model(str(folder), device=str(device), stream=False), device)
    model = lm.model
    params = sum(p.numel() for p in model.parameters())
    recipe = build_recipe(Arm(solver="gptq", codec={"uniform": {"bits": 4, "group": 128}}))
    calib = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    count = [0]

    def progress(n=1):
        count[0] += n

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs, packed = timed(lambda: quantize_model(model, recipe, calib, 0, progress), device)
    n_weights = sum(p.shape[0] * p.shape[1] for p in packed.values())
    bits = 8 * sum(p.nbytes for p in packed.values()) / n_weights
    out = {"model": "random Llama, TinyLlama shape (bench/peak_memory.py)", "layers": layers, "params": params,
           "calib_samples": samples, "calib_seq_len": seq_len, "codec": "uniform 4-bit g128", "solver": "gptq",
           "tensors": count[0], "bits_per_weight": bits, "load_seconds": load_s, "quantize_seconds": secs}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / (1 << 20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers of the random Llama (22: 1.10 B params)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a dry run")
    ap.add_argument("--only", default="gptq,eval,e2e_1b", help="comma-separated subset of gptq,eval,e2e_1b")
    ap.add_argument("--dir", default=os.environ.get("QUANTATLAS_BENCH_DIR", "/tmp/quantatlas-bench"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_figures.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_figures: no CUDA device here (torch.cuda.is_available() is False); --device cpu is a dry run")
    only = set(a.only.split(","))
    if only - {"gptq", "eval", "e2e_1b"}:
        sys.exit(f"cuda_figures: --only {a.only}: unknown {', '.join(sorted(only - {'gptq', 'eval', 'e2e_1b'}))} "
                 "(choose from gptq, eval, e2e_1b)")
    from quantatlas.environment import device_name

    res = {"device": device_name(device), "torch": torch.__version__, "quick": a.quick,
           "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if "gptq" in only:
        shapes = [(512, 512), (1376, 512)] if a.quick else [(4096, 4096), (11008, 4096)]
        res["gptq"] = []
        for rows, cols in shapes:
            r = gptq_layer(rows, cols, 1024 if a.quick else 4096, a.repeats, device)
            res["gptq"].append(r)
            print(f"gptq uniform4 g128  {r['shape']:>10}  {r['seconds']:8.3f} s  (median of {a.repeats})", flush=True)
    if "eval" in only:
        old = os.environ.get("QUANTATLAS_CACHE")
        with tempfile.TemporaryDirectory() as cache:   # the reference logits computed here, not read from a cache
            os.environ["QUANTATLAS_CACHE"] = cache
            try:
                r = res["eval"] = eval_throughput(8192 if a.quick else 65536, a.repeats, device)
            finally:
                if old is None:
                    del os.environ["QUANTATLAS_CACHE"]
                else:
                    os.environ["QUANTATLAS_CACHE"] = old
        print(f"full evaluation     {r['eval_tokens']:>10} tok  {r['seconds']:8.3f} s  {r['tokens_per_s']:10.0f} tok/s "
              f"({r['scored_tokens_per_s']:.0f} scored tok/s; reference pass {r['reference_pass_seconds']:.3f} s)",
              flush=True)
    if "e2e_1b" in only:
        samples, seq = (4, 128) if a.quick else (64, 512)
        r = res["e2e_1b"] = e2e_quantize(a.layers, samples, seq, Path(a.dir), device)
        print(f"GPTQ end to end     {r['params'] / 1e9:6.3f} B params ({a.layers} layers)  "
              f"{r['quantize_seconds']:8.1f} s (load {r['load_seconds']:.1f} s, {r['tensors']} tensors, "
              f"{r['bits_per_weight']:.3f} bits/wt)", flush=True)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
