"""Eval overhead: wall time of a full KLD evaluation of a quantized reference model divided by
the wall time of bare forward passes over the same tokens (target: at most 1.3); and KV rows: a
KLD evaluation with a quantized KV cache over a plain one (target: at most 1.5).

    python bench/eval_overhead.py [--tokens 65536] [--ctx 512] [--device cpu] [--repeats 3] [--kv-only]

KV rows print wall-clock and process CPU time ratios (minima over interleaved repeats).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantatlas.eval.windows import make_eval_set, reference_logprobs, scored_logits
from quantatlas.models import load_model
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.measure import evaluate
from quantatlas.spec import Arm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/eval_overhead.json")
    ap.add_argument("--kv-only", action="store_true", help="only the KV rows (the JSON keeps the other figures)")
    a = ap.parse_args()

    lm = load_model("reference", device=a.device)
    es = make_eval_set(lm.text_tokens("stdlib", "eval"), a.tokens, a.ctx)
    ref = reference_logprobs(lm.model, lm.model_hash, es, a.device, a.batch)

    def sync():
        if torch.device(a.device).type == "cuda":
            torch.cuda.synchronize()

    if a.kv_only:
        old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
        old["kv"] = kv_rows(es, ref, a, sync)
        old["kv"].update(tokens=int(es.windows.numel()), ctx=a.ctx, device=a.device)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(old, indent=2) + "\n")
        return
    model = lm.model
    quantize_model(model, build_recipe(Arm(codec={"uniform": {"bits": 4, "group": 128}})), None, 0)

    def bare():
        with torch.no_grad():
            for _ in scored_logits(model, es, a.batch, a.device):
                pass
        sync()

    def full():
        evaluate(model, es, ref, a.device, a.batch)
        sync()

    bare()  # warm-up
    t_bare, t_full = [], []
    for _ in range(a.repeats):  # interleave so drift hits both alike
        t0 = time.perf_counter(); bare(); t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); full(); t_full.append(time.perf_counter() - t0)
    res = {"device": a.device, "tokens": int(es.windows.numel()), "tokens_scored": es.n_scored, "ctx": a.ctx,
           "bare_forward_s": min(t_bare), "kld_eval_s": min(t_full), "ratio": min(t_full) / min(t_bare),
           "target": 1.3}
    print(f"bare forward {res['bare_forward_s']:.3f} s, KLD evaluation {res['kld_eval_s']:.3f} s, "
          f"ratio {res['ratio']:.3f} (target <= 1.3) over {res['tokens']} tokens on {a.device}")
    res["kv"] = kv_rows(es, ref, a, sync)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


#: KV rows: the fp16-weight model with a quantized cache against the same model without one
KV_ROWS = {
    "q8_0 K+V": {"k": "q8_0", "v": "q8_0"},
    "q4_0 K rotated": {"k": "q4_0", "rotate": True},
    "KIVI-2 R=128": {"k": {"uniform": {"bits": 2, "group": None, "symmetric": False}},
                     "v": {"uniform": {"bits": 2, "group": 32, "symmetric": False}},
                     "k_granularity": "channel", "residual": 128},
    "q4_0 K+V R=64 S=4": {"k": "q4_0", "v": "q4_0", "residual": 64, "sinks": 4},
}


def kv_rows(es, ref, a, sync) -> dict:
    """KLD evaluation with a quantized KV cache over a plain KLD evaluation of the same (fp16-weight)
    model (target: at most 1.5)."""
    import copy

    from quantatlas.quant.kv import KVCacheConfig, KVCacheQuantizer

    fp = load_model("reference", device=a.device).model   # main() quantized the weights of its copy
    models = {"plain": fp}
    for name, cfg in KV_ROWS.items():
        m = copy.deepcopy(fp)
        KVCacheQuantizer(KVCacheConfig(**cfg)).attach(m)
        models[name] = m

    def timed(m):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate(m, es, ref, a.device, a.batch)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    # wall and process CPU seconds, minima over interleaved repeats: on a shared CPU the process
    # time of a one-thread run is the steadier figure (it does not count time spent waiting for a core)
    times = {name: [] for name in models}
    for m in models.values():
        timed(m)  # warm-up
    for _ in range(a.repeats):
        for name, m in models.items():
            times[name].append(timed(m))
    best = {name: min(w for w, _ in t) for name, t in times.items()}
    cpu = {name: min(c for _, c in t) for name, t in times.items()}
    out = {"plain_eval_s": best["plain"], "plain_eval_cpu_s": cpu["plain"], "target": 1.5, "rows": {}}
    for name in KV_ROWS:
        ratio, cpu_ratio = best[name] / best["plain"], cpu[name] / cpu["plain"]
        out["rows"][name] = {"eval_s": best[name], "ratio": ratio, "eval_cpu_s": cpu[name], "cpu_ratio": cpu_ratio}
        print(f"KV {name}: KLD evaluation {best[name]:.3f} s vs plain {best['plain']:.3f} s, "
              f"ratio {ratio:.3f}; CPU time {cpu[name]:.3f} s vs {cpu['plain']:.3f} s, ratio {cpu_ratio:.3f} "
              f"(target <= 1.5)")
    return out


if __name__ == "__main__":
    main()
