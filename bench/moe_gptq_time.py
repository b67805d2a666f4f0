"""GPTQ's quantization time on a mixture of experts against a dense model, per active parameter (issue 27).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/moe_gptq_time.py [--models reference,reference-moe]
        [--calib-samples 16] [--calib-seq-len 512] [--repeats 2] [--threads 1] [--seed 0]
        [--out bench/results/moe_gptq_time.json]

For each embedded model: GPTQ int4 g128 with the current defaults (`solver: gptq`, `uniform {bits: 4,
group: 128}`; on the MoE model routing-aware expert Hessians, starved experts rounded to nearest), the arm
quantized exactly as `quantatlas run` does it (`quantatlas.quant.pipeline.quantize` on the same calibration
draw: --calib-samples windows of --calib-seq-len tokens, seed --seed), the calibration tokens read before
the clock starts. Timed with perf_counter (wall) and process_time (CPU: on a shared machine the steadier
figure); the minimum over --repeats runs of each model is kept.

Time per active parameter: a token of a dense model uses every parameter; a token of reference-moe uses
its router's top-2 of 8 experts per layer and every other tensor (`reference.model.active_parameters`).
The ratio (MoE seconds per active parameter) / (dense seconds per active parameter) is the issue's target
(<= 1.5). Also printed: the ratio per quantized weight (every expert counted), which says how much of the
gap is simply the MoE model holding 4x the expert weights that a token touches.

Each run is split by stage (wrappers around the pipeline's functions, two clock reads per call):
  statistics  quant/quantize.py `collect_statistics`: the calibration passes whose hooks build the Hessians
              (on MoE: the routing tap and each expert's X^T X from its routed tokens) ...
    experts     ... of which models/moe.py `ExpertStatistics.add` (the per-expert accumulation)
  routing     quant/quantize.py `count_routing`: the pass that counts tokens per expert (MoE only)
  solve       `GPTQ.solve` and `GPTQ.solve_batch` (damping, Cholesky, the column loop, the codes; on MoE the
              experts of one role in a layer go through `solve_batch` together: solvers/gptq.py `gptq_batched`)
  propagation quant/quantize.py `advance`: the calibration stream through each solved layer
  other       the rest of `quantize` (model copy, plans, weight writes)
Writes --out (JSON) and prints the table. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from gptq_time_split import Clock   # bench/ is the script's folder: the same stage timer

ROOT = Path(__file__).resolve().parents[1]
ARM = {"solver": "gptq", "codec": {"uniform": {"bits": 4, "group": 128}}}
STAGES = ("statistics", "experts", "routing", "solve", "propagation")
INSIDE = {"experts": "statistics"}


def one_model(name: str, args) -> dict:
    import quantatlas.quant.quantize as qz
    from quantatlas.context import RunContext
    from quantatlas.measure import calibration_for
    from quantatlas.models import load_model
    from quantatlas.models.moe import ExpertStatistics
    from quantatlas.quant.pipeline import quantize
    from quantatlas.quant.solvers.gptq import GPTQ
    from quantatlas.reference.model import active_parameters
    from quantatlas.spec import parse_spec

    lm = load_model(name, device="cpu")
    spec = parse_spec({"title": "moe gptq time", "model": name, "seeds": [args.seed],
                       "data": {"calib": {"samples": args.calib_samples, "seq_len": args.calib_seq_len},
                                "eval": {"tokens": 1024, "ctx": 512}},
                       "arms": {"gptq4": ARM}})
    calibration = calibration_for(lm, spec, "gptq4")
    ctx = RunContext(args.seed, "cpu", torch.get_num_threads())
    calibration.tokens(ctx)                      # read and drawn before the clock
    runs = []
    for _ in range(args.repeats):
        clock = Clock(STAGES)
        clock.wrap(qz, "collect_statistics", "statistics")
        clock.wrap(ExpertStatistics, "add", "experts")
        clock.wrap(qz, "count_routing", "routing")
        clock.wrap(GPTQ, "solve", "solve")
        clock.wrap(GPTQ, "solve_batch", "solve")
        clock.wrap(qz, "advance", "propagation")
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            qm = quantize(lm, spec.arms["gptq4"], calibration, ctx, None, "arms.gptq4")
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        finally:
            clock.unwrap()
        for fig, total in ((clock.wall, wall), (clock.cpu, cpu)):
            fig["other"] = total - sum(v for k, v in fig.items() if k not in INSIDE)
            fig["total"] = total
        runs.append({"wall_s": {k: round(v, 3) for k, v in clock.wall.items()},
                     "cpu_s": {k: round(v, 3) for k, v in clock.cpu.items()}, "calls": clock.calls})
        del qm
    best = min(runs, key=lambda r: r["cpu_s"]["total"])
    model = lm.model
    cfg = model.config
    n_experts, top_k = getattr(cfg, "num_experts", None), getattr(cfg, "num_experts_per_tok", None)
    linear = sum(p.numel() for n, p in model.named_parameters()
                 if n.startswith("model.layers.") and p.dim() >= 2 and ".mlp.gate.weight" not in n)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    active_linear = linear - expert + (expert * top_k // n_experts if n_experts else 0)
    return {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
            "active_parameters": active_parameters(model), "quantized_weights": linear,
            "active_quantized_weights": active_linear, "runs": runs, "best": best}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="reference,reference-moe", help="dense first, then the MoE model")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_gptq_time.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense_name, moe_name = [m.strip() for m in args.models.split(",")]
    before = uptime()
    dense, moe = one_model(dense_name, args), one_model(moe_name, args)
    after = uptime()

    def per(r, key, clock="cpu_s"):
        return r["best"][clock]["total"] / r[key]

    ratio = {f"{clock}_per_{key}": per(moe, key, clock) / per(dense, key, clock)
             for clock in ("cpu_s", "wall_s") for key in ("active_parameters", "active_quantized_weights",
                                                          "quantized_weights")}
    head = f"{'stage':<14}" + "".join(f"{r['model'] + ' cpu s':>22}{'wall s':>9}" for r in (dense, moe))
    lines = [head, "-" * len(head)]
    for stage in (*STAGES, "other", "total"):
        label = ("  " + stage) if stage in INSIDE else stage
        lines.append(f"{label:<14}" + "".join(f"{r['best']['cpu_s'][stage]:>22.2f}{r['best']['wall_s'][stage]:>9.2f}"
                                              for r in (dense, moe)))
    lines.append("")
    for r in (dense, moe):
        lines.append(f"{r['model']}: {r['parameters']:,} parameters, {r['active_parameters']:,} active; "
                     f"{r['quantized_weights']:,} quantized weights, {r['active_quantized_weights']:,} active")
    lines.append(f"ratio (MoE / dense CPU seconds per active parameter): {ratio['cpu_s_per_active_parameters']:.2f} "
                 f"(target <= 1.5); wall {ratio['wall_s_per_active_parameters']:.2f}; "
                 f"per quantized weight (every expert counted): {ratio['cpu_s_per_quantized_weights']:.2f}")
    print("\n".join(lines))
    out = {"arm": ARM, "calib": {"samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": args.seed},
           "threads": args.threads, "repeats": args.repeats, "dense": dense, "moe": moe, "ratio": ratio,
           "target": 1.5, "meets_target": ratio["cpu_s_per_active_parameters"] <= 1.5,
           "uptime_before": before, "uptime_after": after}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
