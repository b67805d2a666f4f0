"""Ray sweep speed-up: one spec (reference model, 4 arms x 2 seeds of GPTQ / seeded RTN, every
arm x seed a real run) run serially (one process, `--serial-threads` torch threads, default 1: the
tasks' threads, so both give the same numbers), then as Ray tasks on a local Ray of N CPUs (1 CPU per
task); target: the Ray sweep at least 1.6x faster on 2 CPUs.

    OMP_NUM_THREADS=1 python bench/ray_sweep.py [--cpus 2] [--serial-threads 1] [--tokens 32768] [--ctx 512] [--samples 64]

Both runs are end to end (model load, eval set, runs, results document; the Ray time includes
starting the local Ray and its workers), ledger off, reference logits cached beforehand so neither
run pays for them. Prints both times, the speed-up, the load average, and whether both runs gave the
same numbers; writes bench/results/ray_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from quantatlas.progress import Progress
from quantatlas.runner import Sweep, run_spec
from quantatlas.spec import parse_spec
from quantatlas.sweep import run_spec_ray


def spec(tokens: int, ctx: int, samples: int):
    gptq = {"solver": "gptq"}
    return parse_spec({
        "title": "ray sweep bench", "hypothesis": "-", "model": "reference",
        "data": {"eval": {"tokens": tokens, "ctx": ctx}, "calib": {"samples": samples, "seq_len": 512}},
        "seeds": [0, 1],
        "arms": {  # every arm depends on the seed (calibration draw, or rotation signs): 8 runs
            "gptq_int4_g128": {**gptq, "codec": {"uniform": {"bits": 4, "group": 128}}},
            "gptq_int3_g128": {**gptq, "codec": {"uniform": {"bits": 3, "group": 128}}},
            "gptq_int3_g64": {**gptq, "codec": {"uniform": {"bits": 3, "group": 64}}},
            "rtn_inc_int3_g128": {"codec": {"uniform": {"bits": 3, "group": 128}},
                                  "solver_options": {"incoherence": True}},
        },
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=int, default=2)
    # the eval and calibration sizes most specs in experiments/ use: the fixed cost of starting Ray and its
    # workers weighs on the speed-up as it does in a real sweep of such runs
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--serial-threads", type=int, default=1,
                    help="torch threads of the serial run (1: the tasks' threads, so the same numbers)")
    ap.add_argument("--out", default="bench/results/ray_sweep.json")
    a = ap.parse_args()
    s = spec(a.tokens, a.ctx, a.samples)
    quiet = dict(ledger=False, compress=False, device="cpu", log=lambda m: None)
    torch.set_num_threads(a.cpus)
    with Progress(False) as bars:  # reference logits into the cache first: neither timed run computes them
        Sweep(s, ledger=False, device="cpu").reference(bars)
    load_before = os.getloadavg()

    torch.set_num_threads(a.serial_threads)
    t0 = time.perf_counter()
    serial = run_spec(s, None, **quiet)
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    on_ray = run_spec_ray(s, None, num_cpus=a.cpus, task_cpus=1, **quiet)
    t_ray = time.perf_counter() - t0
    load_after = os.getloadavg()

    def numbers(doc):
        return {(arm, seed): {k: v for k, v in r.items() if k != "seconds"}
                for arm, e in doc["arms"].items() for seed, r in e["seeds"].items()}

    same = numbers(serial) == numbers(on_ray) and "failures" not in on_ray
    differ = sorted({f"{arm} seed {seed}" for (arm, seed), r in numbers(serial).items()
                     if numbers(on_ray).get((arm, seed)) != r})
    runs = len(numbers(serial))
    out = {
        "cpus": a.cpus, "runs": runs, "tokens": a.tokens, "ctx": a.ctx, "calib_samples": a.samples,
        "serial_s": round(t_serial, 2), "serial_threads": a.serial_threads, "ray_s": round(t_ray, 2), "ray_task_cpus": 1,
        "speedup": round(t_serial / t_ray, 3), "same_numbers": same, "runs_that_differ": differ,
        # Ray's own cost: the wall time beyond the tasks' run seconds spread over the CPUs (start, workers, imports)
        "ray_overhead_s": round(t_ray - sum(r["seconds"] for e in on_ray["arms"].values()
                                            for r in e["seeds"].values()) / a.cpus, 2),
        "run_seconds_serial": round(sum(r["seconds"] for e in serial["arms"].values() for r in e["seeds"].values()), 2),
        "run_seconds_ray": round(sum(r["seconds"] for e in on_ray["arms"].values() for r in e["seeds"].values()), 2),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{runs} runs on {a.cpus} CPUs: serial ({a.serial_threads} threads) {t_serial:.1f} s, Ray {t_ray:.1f} s, speed-up {t_serial / t_ray:.2f}x "
          f"(target >= 1.6); same numbers: {same}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
