"""The context slope of a KLD gap: how the difference between two arms (K-cache minus V-cache
errors, say) grows with the eval context, from runs of one spec at several `data.eval.ctx`.

Points: one per ctx and per distinct seed result (a deterministic arm's reused seeds count once),
gap = kld_mean(arm) − kld_mean(minus) on the same eval tokens, with variance se(arm)² + se(minus)²
(the two arms' standard errors; this ignores their positive per-token correlation, so it is an
upper bound on the variance of the paired gap). The slope is the least-squares line gap ~ ctx over
all points (seeds × ctx). Its standard error is the larger of
  - measurement: sqrt(Σ w_i² var_i), w_i = (ctx_i − mean ctx) / Sxx (each point's own noise), and
  - scatter: sqrt(RSS / (n − 2) / Sxx) (how far the points lie off the line; seeds and any
    curvature), when there are more than two points;
the 95 % interval uses the t quantile with n − 2 degrees of freedom when the scatter term is the
larger, the normal one otherwise. Torch-free.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from quantatlas.errors import UserError
from quantatlas.tables import plain_table, render


@dataclass
class Point:
    ctx: int
    seed: str
    kld: float
    kld_minus: float
    var: float

    @property
    def gap(self) -> float:
        return self.kld - self.kld_minus


@dataclass
class Slope:
    arm: str
    minus: str
    points: list[Point]
    slope: float
    intercept: float
    se: float
    se_measurement: float
    se_scatter: float | None
    low: float
    high: float
    basis: str  # "measurement" or "scatter"


def _ctx_of(doc: dict) -> int:
    return int(doc["spec"]["data"]["eval"]["ctx"])


def points(docs: list[dict], arm: str, minus: str) -> list[Point]:
    out = []
    for doc in docs:
        ctx = _ctx_of(doc)
        for name in (arm, minus):
            if name not in doc["arms"]:
                raise UserError(f"context-slope: run {doc.get('title')!r} (ctx {ctx}) has no arm {name!r}; "
                                f"arms: {', '.join(doc['arms'])}")
        a, b = doc["arms"][arm]["seeds"], doc["arms"][minus]["seeds"]
        for seed in sorted(set(a) & set(b), key=str):
            ra, rb = a[seed], b[seed]
            if "reused_from_seed" in ra and "reused_from_seed" in rb:
                continue  # both deterministic: the same measurement again
            out.append(Point(ctx, seed, float(ra["kld_mean"]), float(rb["kld_mean"]),
                             float(ra.get("kld_se", 0.0)) ** 2 + float(rb.get("kld_se", 0.0)) ** 2))
    return out


def context_slope(docs: list[dict], arm: str, minus: str, level: float = 0.95) -> Slope:
    from scipy import stats

    pts = points(docs, arm, minus)
    xs = [p.ctx for p in pts]
    if len(set(xs)) < 2:
        raise UserError(f"context-slope needs runs at two or more ctx values, got {sorted(set(xs))}")
    n = len(pts)
    mx = sum(xs) / n
    my = sum(p.gap for p in pts) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((p.ctx - mx) * (p.gap - my) for p in pts) / sxx
    intercept = my - slope * mx
    se_m = math.sqrt(sum(((p.ctx - mx) / sxx) ** 2 * p.var for p in pts))
    se_s = None
    if n > 2:
        rss = sum((p.gap - intercept - slope * p.ctx) ** 2 for p in pts)
        se_s = math.sqrt(rss / (n - 2) / sxx)
    if se_s is not None and se_s > se_m:
        se, basis, q = se_s, "scatter", stats.t.ppf(0.5 + level / 2, n - 2)
    else:
        se, basis, q = se_m, "measurement", stats.norm.ppf(0.5 + level / 2)
    return Slope(arm, minus, pts, slope, intercept, se, se_m, se_s, slope - q * se, slope + q * se, basis)


def load_docs(paths: list[Path]) -> list[dict]:
    """The result documents (`quantatlas run --json`) at `paths`; a file that is not one: ValueError naming it."""
    docs = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a results JSON of `quantatlas run --json` ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("arms"), dict):
            raise ValueError(f"{p}: not a results JSON of `quantatlas run --json` (no 'arms' mapping)")
        docs.append(doc)
    return docs


def format_slope(s: Slope) -> str:
    table = plain_table(("ctx", "right"), ("seed", "right"), (s.arm + " KLD", "right"), (s.minus + " KLD", "right"),
                        ("gap ± SE", "right"), ("ratio", "right"))
    for p in sorted(s.points, key=lambda p: (p.ctx, p.seed)):
        ratio = p.kld / p.kld_minus if p.kld_minus else float("inf")
        table.add_row(str(p.ctx), str(p.seed), f"{p.kld:.6g}", f"{p.kld_minus:.6g}",
                      f"{p.gap:.4g} ± {math.sqrt(p.var):.2g}", f"{ratio:.3f}")
    lines = [render(table)]
    lines.append(f"slope of ({s.arm} − {s.minus}) KLD per 1000 tokens of ctx: {1000 * s.slope:.4g} "
                 f"(95% CI {1000 * s.low:.4g} … {1000 * s.high:.4g}; SE {1000 * s.se:.2g} from {s.basis}; "
                 f"n = {len(s.points)} points)")
    if s.low > 0:
        verdict = "the gap grows with context (CI above 0)"
    elif s.high < 0:
        verdict = "the gap shrinks with context (CI below 0)"
    else:
        verdict = "no detectable trend with context (CI contains 0)"
    lines.append(verdict)
    return "\n".join(lines)
