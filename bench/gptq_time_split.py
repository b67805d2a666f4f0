"""Where a GPTQ run's time goes (issue 25 part 3): one arm x seed of `quantatlas run`, split by stage.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gptq_time_split.py [--propagation sequential,layer]
        [--bits 4] [--arm '{"solver_options": {"act_order": true, "static_groups": true}}'] [--seed 0]
        [--repeats 1] [--threads 1] [--eval-tokens 32768] [--calib-samples 64] [--calib-seq-len 512]
        [--no-compress] [--out bench/results/gptq_time_split.json]

The arm is GPTQ's first defaults spelled out (`solver: gptq`, act_order and static_groups off,
`uniform {bits, group: 128, clip: minmax, scale: absmax}`) with `propagation` set per run; --arm
deep-merges a partial arm onto it. Each run is `quantatlas.measure.measure_arm`, what `quantatlas
run` calls for one arm x seed, on the reference model in this process, with these functions
wrapped by timers (nothing else changes; each wrapper adds two clock reads per call):

  capture      quant/quantize.py `capture_layer_inputs`: the calibration forward up to decoder layer 0
  collection   quant/quantize.py `run_layer` (its statistics passes: the layer forwards whose hooks feed
               the Hessians, stopped once every module of the group has seen its input) ...
    accumulate   ... of which `InputAccumulator.add` (X Xᵀ and the per-channel sums)
  propagation  quant/quantize.py `advance`: the stream through the solved layer
  solve        `GPTQ.solve` (Cholesky, the column loop, the codes) ...
    pack         ... of which the codec's `pack` (codes into bits, scales to fp16)
  quantize     the whole weight pipeline (`quantatlas.measure.quantize`): the stages above plus the model
               copy, weight writes and the rest (`other`)
  evaluate     `quantatlas.measure.evaluate`: the KLD harness over the eval tokens
  sizes        the rest of measure_arm: the artifact's bytes (packing to a file, zstd-22 / brotli-11)

Each stage's wall (perf_counter) and process CPU seconds (process_time: on a shared machine CPU
seconds are the steadier figure, and with one thread wall ≥ CPU says how much the machine stole),
its calls, and the number of layer passes per decoder layer (collection: `run_layer` calls, one per
calibration batch, per layer and batch, a pass that stops early counting as one; propagation:
`advance` calls, each over every batch, per layer). The
reference log-probs are computed (or read from the cache) once before the runs and timed apart.
Runs alternate the propagation modes, --repeats times; every run's figures are kept and the table
shows each mode's minimum wall run. Writes --out (JSON) and prints the table; `uptime` before
and after. Not part of `make test`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("capture", "collection", "accumulate", "propagation", "solve", "pack", "quantize", "evaluate", "sizes")
#: stages counted inside another one (shown indented, left out of the sum of the top-level stages)
INSIDE = {"accumulate": "collection", "pack": "solve"}
#: the stages that make up `quantize` (their sum against it gives `other`)
QUANTIZE_PARTS = ("capture", "collection", "propagation", "solve")


def first_default_arm(bits: int) -> dict:
    """GPTQ as first released, every option it measures spelled out (the ids stay put when defaults move)."""
    return {"solver": "gptq", "solver_options": {"act_order": False, "static_groups": False},
            "propagation": "sequential",
            "codec": {"uniform": {"bits": bits, "group": 128, "clip": "minmax", "scale": "absmax"}}}


def merged(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Clock:
    """Wall and CPU seconds and calls per stage; `wrap` puts a timer around an attribute of an object."""

    def __init__(self, stages: tuple[str, ...] = STAGES):
        self.wall = dict.fromkeys(stages, 0.0)
        self.cpu = dict.fromkeys(stages, 0.0)
        self.calls = dict.fromkeys(stages, 0)
        self.restore: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, stage: str) -> None:
        original = getattr(owner, attr)   # fails loudly if the pipeline renamed what is timed
        clock = self

        def timed(*args, **kwargs):
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:   # a StopForward ending a collection pass early still counts
                clock.wall[stage] += time.perf_counter() - w0
                clock.cpu[stage] += time.process_time() - c0
                clock.calls[stage] += 1

        self.restore.append((owner, attr, original))
        setattr(owner, attr, timed)

    def unwrap(self) -> None:
        for owner, attr, original in reversed(self.restore):
            setattr(owner, attr, original)
        self.restore.clear()


def one_run(lm, spec, seed: int, es, ref, compress: bool, n_bytes: int) -> dict:
    import quantatlas.measure as measure
    import quantatlas.quant.quantize as qz
    from quantatlas.context import RunContext
    from quantatlas.models.calib import InputAccumulator
    from quantatlas.quant.codecs.uniform import Uniform
    from quantatlas.quant.solvers.gptq import GPTQ

    clock = Clock()
    clock.wrap(qz, "capture_layer_inputs", "capture")
    clock.wrap(qz, "run_layer", "collection")
    clock.wrap(InputAccumulator, "add", "accumulate")
    clock.wrap(qz, "advance", "propagation")
    clock.wrap(GPTQ, "solve", "solve")
    clock.wrap(Uniform, "pack", "pack")
    clock.wrap(measure, "quantize", "quantize")
    clock.wrap(measure, "evaluate", "evaluate")
    try:
        ctx = RunContext(seed, "cpu", torch.get_num_threads())
        calibration = measure.calibration_for(lm, spec, "arm", es)
        w0, c0 = time.perf_counter(), time.process_time()
        res, _, _ = measure.measure_arm(lm, spec, "arm", ctx, es, ref, calibration, None, compress, n_bytes)
        total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        clock.unwrap()
    for fig, total in ((clock.wall, total_wall), (clock.cpu, total_cpu)):
        fig["sizes"] = total - fig["quantize"] - fig["evaluate"]
        fig["other"] = fig["quantize"] - sum(fig[s] for s in QUANTIZE_PARTS)
        fig["total"] = total
    return {"wall_s": {k: round(v, 3) for k, v in clock.wall.items()},
            "cpu_s": {k: round(v, 3) for k, v in clock.cpu.items()},
            "calls": clock.calls, "kld_mean": res["kld_mean"], "bits_per_weight": res["bits_per_weight"]}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def table(runs: list[dict], modes: list[str]) -> str:
    best = {m: min((r for r in runs if r["propagation"] == m), key=lambda r: r["wall_s"]["total"]) for m in modes}
    head = f"{'stage':<16}" + "".join(f"{m + ' wall':>17}{'cpu':>9}{'calls':>7}" for m in modes)
    lines = [head, "-" * len(head)]
    for stage in ("capture", "collection", "accumulate", "propagation", "solve", "pack", "other", "quantize",
                  "evaluate", "sizes", "total"):
        name = ("  " + stage) if stage in INSIDE else stage
        row = f"{name:<16}"
        for m in modes:
            r = best[m]
            calls = r["calls"].get(stage, "")
            row += f"{r['wall_s'][stage]:>17.2f}{r['cpu_s'][stage]:>9.2f}{calls!s:>7}"
        lines.append(row)
    lines.append("")
    for m in modes:
        r = best[m]
        lines.append(f"{m}: {r['passes_per_layer']['collection']:.2f} collection + "
                     f"{r['passes_per_layer']['propagation']:.2f} propagation passes per decoder layer; "
                     f"KLD {r['kld_mean']:.6g}, {r['bits_per_weight']:.3f} bits/weight")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--propagation", default="sequential,layer")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--arm", default="{}", help="a partial arm (JSON) merged onto GPTQ's first defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--no-compress", action="store_true", help="skip the zstd/brotli sizes (as --no-compress)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gptq_time_split.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from quantatlas.eval.bpb import eval_bytes
    from quantatlas.eval.windows import make_eval_set, reference_logprobs
    from quantatlas.models import load_model
    from quantatlas.models.roles import decoder_layers
    from quantatlas.spec import parse_spec

    modes = [m.strip() for m in args.propagation.split(",") if m.strip()]
    arm = merged(first_default_arm(args.bits), json.loads(args.arm))
    before = uptime()
    w0 = time.perf_counter()
    lm = load_model("reference", device="cpu")
    load_s = time.perf_counter() - w0
    specs = {m: parse_spec({"title": "gptq time split", "model": "reference", "seeds": [args.seed],
                            "data": {"calib": {"samples": args.calib_samples, "seq_len": args.calib_seq_len},
                                     "eval": {"tokens": args.eval_tokens, "ctx": 512}},
                            "arms": {"arm": dict(arm, propagation=m)}}) for m in modes}
    ev = specs[modes[0]].data.eval
    es = make_eval_set(lm.text_tokens(ev.source, "eval"), ev.tokens, ev.ctx, ev.score)
    w0 = time.perf_counter()
    ref = reference_logprobs(lm.forward, lm.model_hash, es, "cpu", ev.batch)
    ref_s = time.perf_counter() - w0
    n_bytes = eval_bytes(es, lm.tokenizer)
    n_layers = len(decoder_layers(lm.model))
    batches = -(-args.calib_samples // 8)   # the layer pass's calibration batch (quantize._layerwise's 8)

    runs = []
    for rep in range(args.repeats):
        for m in modes:
            r = one_run(lm, specs[m], args.seed, es, ref, not args.no_compress, n_bytes)
            r.update(propagation=m, repeat=rep,
                     passes_per_layer={"collection": r["calls"]["collection"] / (n_layers * batches),
                                       "propagation": r["calls"]["propagation"] / n_layers})
            runs.append(r)
            print(f"{m} repeat {rep}: total {r['wall_s']['total']:.1f} s wall, quantize "
                  f"{r['wall_s']['quantize']:.1f} s, evaluate {r['wall_s']['evaluate']:.1f} s", flush=True)
    doc = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python bench/gptq_time_split.py "
                      + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "out"),
           "arm": arm, "modes": modes, "seed": args.seed, "threads": args.threads,
           "decoder_layers": n_layers, "calibration_batches": batches, "model_load_s": round(load_s, 3),
           "reference_logprobs_s": round(ref_s, 3), "torch": torch.__version__,
           "uptime_before": before, "uptime_after": uptime(), "runs": runs}
    print()
    print(table(runs, modes))
    print(f"\nmodel load {load_s:.1f} s, reference log-probs {ref_s:.1f} s (cached after the first run)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
