"""MSE per dimension of every registered codec on i.i.d. N(0, 1) weights, against the rate–distortion bound,
with each codec's encoding speed.

For a memoryless Gaussian source of variance 1, no code of R bits per sample does better than
D(R) = 2^(-2R); the gap 10·log10(MSE / D(R)) in dB is what a codec leaves on the table at its
actual stored rate R (codes plus scales, norms, seeds, ... from Packed.bits_per_weight).
The ideal scalar Lloyd-Max quantizer (no side information, R = b) sits 1.62 / 2.74 / 3.45 / 3.87 dB
above D(R) at 1 / 2 / 3 / 4 bits, tending to 10·log10(√3·π/2) = 4.35 dB at high rate.

The list of runs (`bench_runs`) comes from the codec registry: every codec quantatlas registers runs,
with each option set VARIANTS lists for it (none listed: its defaults); a codec with a `bits` option runs
at those of BITS (or BITS_OF[name]) its config accepts, unless its variant fixes `bits`. A codec with a
required option other than `bits` and no variant stops the bench (and tests/test_gaussian_bench.py) with
its name: add it to VARIANTS. NOT_MATRIX_CODECS lists registered configs that are not matrix codecs (with why).

Slow searches run on smaller samples (TRELLIS_ROWS): the bitshift trellis (`trellis`, T·2^L per tile)
at each L of `--trellis-L`, for every code, with the published L = 16 figures (QTIP; exllamav3) beside
it (`vs pub dB` = 10·log10(MSE / published MSE)).

Bounds and estimates without a sample (rows with no speed), per R = 1..4:
* `D(R) = 2^-2R` and the ideal scalar Lloyd-Max quantizer.
* Classic TCQ (Marcellin & Fischer 1990) codes over 2^(R+1) levels. `alphabet-constrained R(D)`: the least
  distortion at rate R of any code whose reproduction values are 2^(R+1) levels (the best ones; Blahut–Arimoto
  with the levels moved to their centroids, `coded_limit`); it is what the doubled alphabet alone costs:
  0.04 / 0.12 / 0.18 / 0.21 dB. `uniform-use code limit`: the same for codes whose words use every level
  equally often, as a fixed-rate trellis's words do (every path bit string is a word): the limit of random
  codes drawn i.i.d. uniform on the levels, rate log2(2^(R+1)) − H(Y|X): 0.25 / 0.82 / 1.20 / 1.42 dB. TCQ's
  trellis is such a code, and as its states grow it tends there (2 bits, trained levels, from 2^-4: 1.39 /
  1.27 / 1.11 dB at 8 / 32 / 256 states, 1.04 dB at 256 with one path per row, T = 4096; the limit's best
  levels lie within 0.04 of the trained 256-state ones). So fixed-rate TCQ does not come within 0.3 dB of
  D(R) at 2 bits at any number of states (a limit of the ensemble, not a theorem for every trellis); the
  doubled alphabet is not what stops it, the equal use of its levels is: variable rate (entropy-coded TCQ)
  or a trellis whose values are Gaussian-distributed (QTIP's codes, `trellis`: 0.42 dB at L = 16) get closer.
* `Zador sphere, n`: the high-resolution (Zador) estimate of the best n-dimensional fixed-rate quantizer of
  N(0, I_n) at R bits per dimension, every cell a ball and the point density ∝ p^(n/(n+2)):
  D ≈ (1/(n+2))·(M·V_n)^(−2/n)·‖p‖_{n/(n+2)}, M = 2^(nR), V_n the unit ball's volume and, for N(0, I_n),
  ‖p‖_{n/(n+2)} = (∫p^(n/(n+2)))^((n+2)/n) = 2π·((n+2)/n)^((n+2)/2). `E8 / Λ24 + ideal shaping`: the same with
  the lattice's cells: × G(Λ)/G(ball_n), G(ball_n) = Γ(n/2+1)^(2/n)/((n+2)π), G(E8) = 0.071682,
  G(Λ24) = 0.065771 (Conway & Sloane). These are high-resolution approximations, NOT bounds at these rates:
  n = 1 gives Panter–Dite's √3·π/2·2^(−2R), 0.170 at R = 2, above the real Lloyd–Max MSE 0.1175. (Calibration
  at the codebooks' 2 bits: E8P (one scale per row) sits 0.26 dB above the E8 estimate, Leech 0.25 dB above
  the Λ24 one, 0.0731: the estimate for n = 24 is above QTIP's 0.0686 at L = 16, a 256-long trellis.)

Speed: `w/cpu-s` is weights encoded per second of CPU time (`codec.encode`, the search included, decode
not; the process's CPU time over all its torch threads, so a busy shared machine does not slow it down
as wall time would; the JSON also has wall-clock `weights_per_second`). With OMP_NUM_THREADS=1 it is
what one core of this machine encodes per second: what runs on a laptop.

    .venv/bin/python bench/gaussian_mse.py [--rows 256] [--cols 4096] [--seed 0] [--codecs tcq,e8p,d4]
                                           [--trellis-L 12,16] [--trellis-rows 64] [--trellis-rows-16 8] [--merge]

--merge keeps the rows of the codecs not run now from the JSON already at --out (same sample settings).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from scipy import optimize, special, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantatlas.quant.codecs import make_codec  # noqa: E402
from quantatlas.quant.config import registry  # noqa: E402
from quantatlas.quant.lloyd_max import codebook  # noqa: E402

BITS = (2, 3, 4)
#: bits a codec with a `bits` option runs at, where not BITS
BITS_OF = {"tcq": (1, 2, 3, 4), "leech": (1, 2)}
#: option sets per codec (its `bits` added from BITS unless given); a codec not listed runs with its defaults
VARIANTS: dict[str, list[dict]] = {
    "uniform": [{"group": 128}, {"group": 128, "clip": "mse"}, {"group": 128, "symmetric": False, "clip": "mse"}],
    "lloyd_max": [{"group": 128, "scale": "rms"}, {"group": 128, "scale": "absmax"}],
    "turbo": [{"group": 128}, {"group": 128, "codebook": "gaussian"}, {"group": 128, "norm_correction": False},
              {"group": 64}, {"group": 256}],
    # lattices (issue 15 part 4); e8p with one scale per row is QuIP#'s setting (one per matrix there)
    "e8p": [{"group": None}, {"group": 128}],
    "e8": [{"group": 128}, {"group": 128, "scale_search": False}],
    "d4": [{"group": 128}, {"group": 128, "scale_search": False}],
    # D_n (issue 28 part 2): 4096 = 341·12 + 4, so D12 takes one scale per row (a short last block)
    "dn": [{"n": 8, "group": 128}, {"n": 8, "group": None}, {"n": 12, "group": None}, {"n": 16, "group": 128},
           {"n": 16, "group": None}],
    "nestquant": [{"group": 128, "betas": 1}, {"group": 128, "betas": 4}, {"group": 128, "betas": 8}],
    # classic TCQ (issue 28 part 4): 1-4 bits, 8/32/256 states, Lloyd-Max levels; uniform levels at 256; trained
    # levels (Marcellin & Fischer's codebook design) at 8/32/256
    "tcq": [{"states": 8}, {"states": 32}, {"states": 256}, {"states": 256, "levels": "uniform"},
            {"states": 8, "levels": "trained"}, {"states": 32, "levels": "trained"},
            {"states": 256, "levels": "trained"}],
    # AQLM needs its codebooks: M codebooks of 2^B entries per 8 weights, M·B/8 bits per weight
    "aqlm": [{"codebooks": 1, "code_bits": 8}, {"codebooks": 2, "code_bits": 8}, {"codebooks": 3, "code_bits": 8}],
    "mx": [{"element": "fp4_e2m1"}, {"element": "fp6_e2m3"}, {"element": "fp8_e4m3"}],
    "polarquant": [{"group": 128}, {"group": 64, "bits": [4, 2, 2, 2]}],   # + the paper's 4/2/2/2: 3.875 bits
    # Leech lattice Λ24 (issue 28 part 1): the lattice points (Euclidean) or their directions and 1 or 2 gain
    # bits; 3×8 tiles (256 rows padded to 258), one scale per row or per 128 columns
    "leech": [{"group": None}, {"bits": 2, "group": None, "gain_bits": 1}, {"bits": 2, "group": None, "gain_bits": 2},
              {"bits": 2, "group": 128}],
    # the bitshift trellis is listed by `trellis_variants` (per L, on its own sample)
}
#: registered codec configs that do not quantize a matrix themselves
NOT_MATRIX_CODECS = {"gguf": "a per-tensor mixture of the ggml types (each of which runs here on its own)"}
#: rows of the sample for codecs whose search is slow (None: the main sample)
TRELLIS_ROWS = {"L<16": 64, "L16": 8}

#: i.i.d. N(0, 1) MSE at 2 / 3 / 4 bits of the L = 16 trellis codes as published
TRELLIS_PUBLISHED = {"1mad": (0.0686, 0.0178, 0.0046), "3inst": (0.0699, 0.0181, 0.0047)}
TRELLIS_CODES = (("1mad", 1), ("3inst", 1), ("hyb", 2), ("gaussian", 1))

#: normalised second moments of lattice cells (Conway & Sloane, SPLAG, Table 2.3): name -> (n, G)
LATTICE_G = {"E8": (8, 0.071682), "Λ24": (24, 0.065771)}
#: dimensions of the Zador rows
ZADOR_DIMS = (8, 24)
#: coded_limit(codebook(R + 1).levels, R, uniform_use) per R: (alphabet-constrained D, uniform-use D), from
#: `coded_limit` with its defaults (R = 3, 4 take minutes: tabulated; tests/test_gaussian_bench.py recomputes R = 1)
CODED_LIMITS = {1: (0.25254, 0.26454), 2: (0.06425, 0.07553), 3: (0.01627, 0.02060), 4: (0.00410, 0.00542)}


@dataclass
class Run:
    codec: str
    options: dict
    sample: str = "main"          # which sample: "main", or "trellis L=<L>" (fewer rows)
    extra: dict = field(default_factory=dict)


def trellis_variants(trellis_L) -> list[Run]:
    runs = []
    for L in trellis_L:
        for bits in BITS:
            for code, V in TRELLIS_CODES:
                if L >= 16 and code not in TRELLIS_PUBLISHED:
                    continue  # at L = 16 on CPU: only the codes with published figures
                extra = {}
                if L == 16 and code in TRELLIS_PUBLISHED:
                    extra["published_mse"] = TRELLIS_PUBLISHED[code][bits - 2]
                runs.append(Run("trellis", {"bits": bits, "L": L, "V": V, "code": code}, f"trellis L={L}", extra))
    return runs


def takes_bits(cls) -> bool:
    return "bits" in cls.model_fields


def accepts(cls, options: dict) -> bool:
    try:
        cls.model_validate(options)
    except ValidationError:
        return False
    return True


def bench_runs(codecs: dict | None = None, trellis_L=(12, 16)) -> list[Run]:
    """Every run of the bench, from the registered codecs (default: quantatlas's own, not test toys).
    Raises ValueError naming a codec with a required option and no variant here."""
    if codecs is None:
        codecs = {n: c for n, c in registry("codec").items() if c.__module__.startswith("quantatlas.")}
    missing = {}
    runs: list[Run] = []
    for name, cls in sorted(codecs.items()):
        if name in NOT_MATRIX_CODECS:
            continue
        if name == "trellis":
            runs += trellis_variants(trellis_L)
            continue
        required = sorted(k for k, f in cls.model_fields.items() if f.is_required() and k != "bits")
        variants = VARIANTS.get(name, [{}])
        lacking = sorted({k for v in variants for k in required if k not in v})
        if lacking:
            missing[name] = lacking
            continue
        for opts in variants:
            if takes_bits(cls) and "bits" not in opts:
                # the bits this config takes (a Literal, a range, a rule with other options); none is an error
                allowed = [b for b in BITS_OF.get(name, BITS) if accepts(cls, {"bits": b, **opts})]
                if not allowed:
                    raise ValueError(f"bench/gaussian_mse.py: codec {name!r} with {opts} takes none of the bits "
                                     f"{BITS_OF.get(name, BITS)}: set BITS_OF[{name!r}] or its variants")
                runs += [Run(name, {"bits": b, **opts}) for b in allowed]
            else:
                runs.append(Run(name, dict(opts)))
    if missing:
        raise ValueError("bench/gaussian_mse.py: " + "; ".join(
            f"codec {n!r} has required options {o} and no variant in VARIANTS that sets them"
            for n, o in missing.items()))
    return runs


def nominal_bits(name: str, options: dict, rate: float) -> int:
    """The codec's `bits` option, else the digit of a format named by its bits (q4_1, iq4_xs, mxfp4, nvfp4,
    fp8), else its stored rate rounded down."""
    bits = options.get("bits")
    if isinstance(bits, int):
        return bits
    m = re.match(r"(?:i?q|mxfp|nvfp|fp)(\d)", name)
    return int(m.group(1)) if m else int(math.floor(rate + 1e-9))


def measure(name: str, options: dict, w: torch.Tensor) -> dict:
    codec = make_codec(name, options)
    t, cpu = time.perf_counter(), time.process_time()
    packed = codec.encode(w)
    encode_s, encode_cpu = time.perf_counter() - t, time.process_time() - cpu
    w_hat = codec.decode(packed)
    seconds = time.perf_counter() - t
    mse = float(((w_hat.double() - w.double()) ** 2).mean())
    rate = packed.bits_per_weight
    return {"codec": name, "options": options, "bits_per_weight": rate, "mse": mse,
            "gap_db": 10 * math.log10(mse / 2 ** (-2 * rate)) if mse > 0 else -math.inf, "seconds": seconds,
            "encode_seconds": encode_s, "weights_per_second": w.numel() / max(encode_s, 1e-9),
            "encode_cpu_seconds": encode_cpu, "weights_per_cpu_second": w.numel() / max(encode_cpu, 1e-9),
            "nominal_bits": nominal_bits(name, options, rate)}


def run_all(runs: list[Run], samples: dict[str, torch.Tensor], log=print) -> list[dict]:
    rows = []
    for r in runs:
        w = samples[r.sample]
        row = {**measure(r.codec, r.options, w), "sample": list(w.shape), **r.extra}
        if "published_mse" in row:
            row["vs_published_db"] = 10 * math.log10(row["mse"] / row["published_mse"])
        rows.append(row)
        log(f"  {r.codec} {r.options}: MSE {row['mse']:.5f} at {row['bits_per_weight']:.3f} bpw "
            f"({row['weights_per_cpu_second']:.3g} w/cpu-s)")
    return rows


def samples_for(runs: list[Run], rows: int, cols: int, seed: int, trellis_rows: int, trellis_rows_16: int):
    out = {"main": torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))}
    for r in runs:
        if r.sample not in out:
            L = r.options["L"]
            n = trellis_rows_16 if L >= 16 else trellis_rows
            out[r.sample] = torch.randn(n, cols, generator=torch.Generator().manual_seed(seed + 1000 * L))
    return out


# ---- bounds and estimates without a sample -------------------------------------------------------------
def ball_second_moment(n: int) -> float:
    """G of the n-ball: (1/n)·∫_ball ‖x‖²/V^(1+2/n) = Γ(n/2+1)^(2/n)/((n+2)π)."""
    return math.exp(2 / n * special.gammaln(n / 2 + 1)) / ((n + 2) * math.pi)


def zador_mse(n: int, R: float) -> float:
    """Zador's high-resolution MSE per dimension of the best n-dimensional fixed-rate quantizer of N(0, I_n)
    with M = 2^(nR) ball-shaped cells: (1/(n+2))·(M·V_n)^(−2/n)·‖p‖_{n/(n+2)}. For p = N(0, I_n),
    ∫p^a = (2π)^(n(1−a)/2)·a^(−n/2), so with a = n/(n+2): ‖p‖_a = (∫p^a)^(1/a) = 2π·((n+2)/n)^((n+2)/2).
    (Logs throughout: M·V_n overflows a float for large n.)"""
    log_mv = n * R * math.log(2) + n / 2 * math.log(math.pi) - special.gammaln(n / 2 + 1)
    log_norm = math.log(2 * math.pi) + (n + 2) / 2 * math.log((n + 2) / n)
    return math.exp(-2 / n * log_mv + log_norm) / (n + 2)


def coded_limit(levels, R: float, uniform_use: bool, grid: int = 4001, tol: float = 1e-10,
                max_iter: int = 20000) -> tuple[float, np.ndarray]:
    """The least MSE at rate R (bits per sample) of codes for N(0, 1) whose reproduction values are len(levels)
    levels, the levels chosen best (started at `levels`): (D, the levels). N(0, 1) on a grid of ±8.

    uniform_use False: the alphabet-constrained R(D) (Blahut–Arimoto: test channel W(y|x) ∝ q(y)·e^(−s(x−y)²),
    q the output law); True: codes whose words use every level equally often (q uniform, so the rate is
    log2 M − H(Y|X): random codes drawn i.i.d. uniform on the levels reach it). For a slope s the levels and q are
    iterated to their fixed point (each level the centroid of its share of W); s by root finding on the rate."""
    x = np.linspace(-8, 8, grid)
    p = stats.norm.pdf(x)
    p /= p.sum()
    state = {"y": np.array(levels, dtype=np.float64), "q": np.full(len(levels), 1 / len(levels))}

    def at(log_s: float):
        y, q = state["y"], state["q"]
        for _ in range(max_iter):
            logw = np.log(q)[None] - math.exp(log_s) * (x[:, None] - y[None]) ** 2
            w = np.exp(logw - logw.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)
            py = p @ w
            y_new, q_new = (p * x) @ w / py, (q if uniform_use else py)
            done = max(abs(y_new - y).max(), abs(q_new - q).max()) < tol
            y, q = y_new, q_new
            if done:
                break
        state["y"], state["q"] = y, q                                    # warm start for the next slope
        lw = np.log2(np.maximum(w, 1e-300))
        info = lw if uniform_use else lw - np.log2(np.maximum(py, 1e-300))[None]
        rate = (math.log2(len(y)) if uniform_use else 0.0) + float(p @ (w * info).sum(1))
        return rate, float(p @ (w * (x[:, None] - y[None]) ** 2).sum(1)), y

    log_s = optimize.brentq(lambda v: at(v)[0] - R, -2.0, 12.0, xtol=1e-9)
    _, D, y = at(log_s)
    return D, y


def bound_row(name: str, bits: int, mse: float, **options) -> dict:
    return {"codec": name, "options": {"bits": bits, **options}, "bits_per_weight": float(bits), "mse": mse,
            "gap_db": 10 * math.log10(mse / 2 ** (-2 * bits)), "nominal_bits": bits}


def bound_rows(bits_list) -> list[dict]:
    out = []
    for bits in bits_list:
        out.append(bound_row("ideal scalar Lloyd-Max", bits, codebook(bits).mse))
        out.append(bound_row("D(R) = 2^-2R", bits, 2.0 ** (-2 * bits)))
        if bits in CODED_LIMITS:
            constrained, uniform_use = CODED_LIMITS[bits]
            out.append(bound_row("alphabet-constrained R(D)", bits, constrained, levels=2 ** (bits + 1)))
            out.append(bound_row("uniform-use code limit", bits, uniform_use, levels=2 ** (bits + 1)))
        for n in ZADOR_DIMS:
            out.append(bound_row(f"Zador sphere, n={n}", bits, zador_mse(n, bits)))
        for lattice, (n, G) in LATTICE_G.items():
            out.append(bound_row(f"{lattice} + ideal shaping", bits, zador_mse(n, bits) * G / ball_second_moment(n)))
    return out


def is_bound(row: dict) -> bool:
    return "sample" not in row


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'bits':>4}  {'codec':<24} {'options':<44} {'R (bpw)':>8} {'MSE':>10} {'gap dB':>7} {'vs pub dB':>9} "
          f"{'w/cpu-s':>9}  sample")
    for r in sorted(rows, key=lambda r: (r["nominal_bits"], not is_bound(r), r["codec"] != "D(R) = 2^-2R",
                                         r["codec"])):
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items() if k != "bits")
        pub = f"{r['vs_published_db']:+9.3f}" if "vs_published_db" in r else ""
        speed = f"{r['weights_per_cpu_second']:9.3g}" if "weights_per_cpu_second" in r else ""
        sample = "x".join(map(str, r["sample"])) if "sample" in r else ""
        print(f"{r['nominal_bits']:>4}  {r['codec']:<24} {opts:<44} {r['bits_per_weight']:8.4f} "
              f"{r['mse']:10.6f} {r['gap_db']:7.2f} {pub} {speed}  {sample}")


def kept_rows(path: Path, rerun: set[str], args) -> list[dict]:
    """The measured rows of the JSON at `path` whose codec is not in `rerun` (--merge); its sample settings
    must be this run's."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
        results = old["results"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"--merge: {path} is not a results JSON of this bench ({type(e).__name__}: {e})") from None
    if [old.get(k) for k in ("rows", "cols", "seed")] != [args.rows, args.cols, args.seed]:
        raise SystemExit(f"--merge: {path} has rows/cols/seed {old.get('rows')}/{old.get('cols')}/{old.get('seed')}, "
                         f"this run {args.rows}/{args.cols}/{args.seed}")
    return [r for r in results if not is_bound(r) and r["codec"] not in rerun]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trellis-L", default="12,16", help="comma-separated L values for the trellis rows ('' skips)")
    ap.add_argument("--trellis-rows", type=int, default=TRELLIS_ROWS["L<16"], help="rows of the trellis sample, L < 16")
    ap.add_argument("--trellis-rows-16", type=int, default=TRELLIS_ROWS["L16"],
                    help="rows of the trellis sample at L = 16")
    ap.add_argument("--codecs", default="", help="comma-separated codec names to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gaussian_mse.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of the codecs not run now from the JSON at --out (same sample settings)")
    args = ap.parse_args(argv)

    try:
        trellis_L = [int(v) for v in args.trellis_L.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--trellis-L: comma-separated integers, got {args.trellis_L!r}")
    bad = [L for L in trellis_L if not 2 <= L <= 16]    # TrellisConfig's range, refused before any codec runs
    if bad:
        ap.error(f"--trellis-L: each L must be 2..16 (the trellis's state bits), got {bad}")
    runs = bench_runs(trellis_L=trellis_L)
    if args.codecs:
        names = args.codecs.split(",")
        if not all(n.strip() for n in names):
            ap.error(f"--codecs: an empty codec name in {args.codecs!r}")
        unknown = sorted(set(names) - {r.codec for r in runs})
        if unknown:
            ap.error(f"--codecs: no runs for {', '.join(unknown)} (codecs here: "
                     f"{', '.join(sorted({r.codec for r in runs}))})")
        runs = [r for r in runs if r.codec in set(names)]
    samples = samples_for(runs, args.rows, args.cols, args.seed, args.trellis_rows, args.trellis_rows_16)
    rows = run_all(runs, samples)
    if args.merge:
        rows = kept_rows(args.out, {r.codec for r in runs}, args) + rows
    bits_seen = sorted({r["nominal_bits"] for r in rows if 1 <= r["nominal_bits"] <= 4} | set(BITS))
    rows = bound_rows(bits_seen) + rows
    print_table(rows, f"i.i.d. N(0,1), {args.rows}x{args.cols}, seed {args.seed}; gap = 10 log10(MSE / 2^(-2R)); "
                      f"w/cpu-s = weights encoded per CPU second, torch threads {torch.get_num_threads()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "gaussian_mse", "rows": args.rows, "cols": args.cols, "seed": args.seed,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
