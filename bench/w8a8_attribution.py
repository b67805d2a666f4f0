"""Where W8A8's KLD comes from on the reference model (issue 14's W8A8 <= 1.5x W8A16 target).

Weights: uniform int8, one fp16 scale per row (RTN), as experiments/act/*.yaml. For every decoder
Linear input (no activation quantization applied): per-token crest factor max|x| / rms(x), the
outlier channels (max over tokens of |x_c| against the median channel), and the error each
quantizer puts on the Linear's OUTPUT relative to that output, ||W (fq(x) - x)|| / ||W x||, next to
the int8 weights' ||(W_q - W) x|| / ||W x|| on the same tokens (first 8 eval windows). Then the KLD
that per-token int8 on one (role group, layer) cell at a time adds to W8A16 (--grid-tokens 0: skip).
KLD per role group, per layer and of the fixes over the whole eval: experiments/act/w8a8_roles.yaml.

    OMP_NUM_THREADS=1 python bench/w8a8_attribution.py [--tokens 32768] [--ctx 512] [--grid-tokens 8192]
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from quantatlas.context import RunContext
from quantatlas.eval.windows import make_eval_set, reference_logprobs
from quantatlas.models import load_model
from quantatlas.models.roles import find_roles
from quantatlas.quant.act import ActConfig, ActivationQuantizer, fake_quantize_rows
from quantatlas.quant.config import build
from quantatlas.quant.hadamard import RandomizedHadamard
from quantatlas.quant.quantize import quantize_model
from quantatlas.quant.recipe import build_recipe
from quantatlas.measure import evaluate
from quantatlas.spec import Arm

GROUPS = {"qkv": ["q", "k", "v"], "o": ["o"], "gate_up": ["gate", "up"], "down": ["down"]}
W8 = {"uniform": {"bits": 8, "group": None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--grid-tokens", type=int, default=8192, help="eval tokens of the role x layer grid")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="bench/results/w8a8_attribution.json")
    a = ap.parse_args()
    torch.manual_seed(0)

    lm = load_model("reference")
    fp = lm.model
    text = lm.text_tokens("stdlib", "eval")
    es = make_eval_set(text, a.tokens, a.ctx)
    ref = reference_logprobs(fp, lm.model_hash, es, "cpu", a.batch)
    w8 = copy.deepcopy(fp)
    quantize_model(w8, build_recipe(Arm(codec=W8)), None, 0)
    res: dict = {"tokens": a.tokens, "ctx": a.ctx}

    # ---- statistics of each decoder Linear input (int8 weights, fp activations) -------------------
    res["inputs"] = input_stats(fp, w8, es, a)
    print(f"{'linear':28s} {'crest med':>9s} {'p99':>6s} {'max':>6s} {'outl ch':>7s} {'top/med':>7s} "
          f"{'W8 out':>8s} {'A8 out':>8s} {'A8 asym':>8s} {'A8 had':>8s} {'A8/W8':>6s}")
    for name, s in res["inputs"].items():
        print(f"{name:28s} {s['crest_median']:9.2f} {s['crest_p99']:6.2f} {s['crest_max']:6.1f} "
              f"{s['outlier_channels']:7d} {s['top_channel_over_median']:7.1f} {s['w8_out_rel']:8.2e} "
              f"{s['a8_out_rel']:8.2e} {s['a8_asym_out_rel']:8.2e} {s['a8_had_out_rel']:8.2e} "
              f"{s['a8_out_rel'] / s['w8_out_rel']:6.2f}")

    # ---- KLD: W8 weights + int8 activations on one (role group, layer) cell at a time ------------
    # (per role group, per layer and the fixes over the full eval: experiments/act/w8a8_roles.yaml)
    def kld(model, act, es_, ref_):
        m = copy.deepcopy(model)
        if act is not None:
            ActivationQuantizer(ActConfig.model_validate(act), 0).attach(m)
        return float(np.mean(evaluate(m, es_, ref_, "cpu", a.batch).kld))

    if a.grid_tokens <= 0:
        return _write(a, res)
    n_layers = 1 + max(t.layer for t in find_roles(fp) if t.layer is not None)
    es_g = make_eval_set(text, a.grid_tokens, a.ctx)
    ref_g = reference_logprobs(fp, lm.model_hash, es_g, "cpu", a.batch)
    base = kld(w8, None, es_g, ref_g)
    full = kld(w8, "W8A8", es_g, ref_g)
    grid = {g: [kld(w8, {"scheme": "W8A8", "roles": roles, "layers": [i]}, es_g, ref_g) - base
                for i in range(n_layers)] for g, roles in GROUPS.items()}
    res["grid"] = {"tokens": a.grid_tokens, "w8a16": base, "w8a8": full, "added_kld": grid}
    print(f"\nKLD added to W8A16 ({base:.3e}; W8A8 everywhere {full:.3e}) by int8 activations on one role "
          f"group of one layer ({a.grid_tokens} eval tokens); cells sum to {sum(map(sum, grid.values())):.3e}")
    print(f"{'':8s}" + "".join(f"{'L' + str(i):>10s}" for i in range(n_layers)))
    for g, row in grid.items():
        print(f"{g:8s}" + "".join(f"{v:10.2e}" for v in row))
    _write(a, res)


def _write(a, res) -> None:
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


@torch.no_grad()
def input_stats(fp, w8, es, a) -> dict:
    """Per decoder Linear: statistics of its input in the int8-weight model (the first 8 eval windows)."""
    a8 = build("codec", W8).for_run(RunContext(0))
    a8_asym = build("codec", {"uniform": {"bits": 8, "group": None, "symmetric": False}}).for_run(RunContext(0))
    fp_w = {t.name: t.module.weight.detach().clone() for t in find_roles(fp) if t.kind == "linear"}
    targets = [t for t in find_roles(w8) if t.kind == "linear" and t.role != "head"]
    seen: dict[str, list] = {t.name: [] for t in targets}
    hooks = [t.module.register_forward_pre_hook(lambda m, args, n=t.name: seen[n].append(args[0].detach()))
             for t in targets]
    try:
        w8(es.windows[:8].to(torch.long))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for t in targets:
        x = torch.cat(seen[t.name]).reshape(-1, t.shape[1]).float()
        w_q, w = t.module.weight.detach().float(), fp_w[t.name].float()
        y = x @ w.T
        ny = y.norm()
        rms = x.pow(2).mean(-1).sqrt()
        crest = (x.abs().amax(-1) / rms)[rms > 0].numpy()         # all-zero rows (if any) have no crest
        ch_max = x.abs().amax(0)
        med = ch_max.median()
        had = RandomizedHadamard(t.shape[1], 0)
        x_had = had.unrotate(fake_quantize_rows(had.rotate(x), a8, t.shape[1]))
        out[t.name] = {
            "role": t.role, "layer": t.layer, "width": t.shape[1],
            "crest_median": float(np.median(crest)), "crest_p99": float(np.percentile(crest, 99)),
            "crest_max": float(crest.max()),
            "outlier_channels": int((ch_max > 6 * med).sum()),
            "top_channel": int(ch_max.argmax()), "top_channel_over_median": float(ch_max.max() / med),
            "x_rel_err_a8": float((fake_quantize_rows(x, a8, t.shape[1]) - x).norm() / x.norm()),
            "w8_out_rel": float((x @ (w_q - w).T).norm() / ny),
            "a8_out_rel": float(((fake_quantize_rows(x, a8, t.shape[1]) - x) @ w.T).norm() / ny),
            "a8_asym_out_rel": float(((fake_quantize_rows(x, a8_asym, t.shape[1]) - x) @ w.T).norm() / ny),
            "a8_had_out_rel": float(((x_had - x) @ w.T).norm() / ny),
        }
    return out


if __name__ == "__main__":
    main()
