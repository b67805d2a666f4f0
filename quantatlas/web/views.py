"""What each page and its JSON twin show, computed from the ledger: one view function per pair
(the page adds only its figures and layout).

    experiment_list      /  and  /api/experiments (grouped by study: study_groups, ?group=study)
    experiment_view      /experiments/{id}  and  /api/experiments/{id} (and .../kld)
    landscape_view       /landscape  and  /api/landscape
    composition_view     /composition  and  /api/composition
    left_to_try_view     /left-to-try  and  /api/left-to-try
    sensitivity_view     /sensitivity  and  /api/sensitivity

No torch: numpy for the per-token KLD distributions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional, get_args

import numpy as np
from fastapi import Query
from pydantic import BeforeValidator

from quantatlas.atlas import studies
from quantatlas.atlas.architecture import ARCH_PATTERN
from quantatlas.atlas.stored import isoformat
from quantatlas.atlas.verdict import RESULTS
from quantatlas.runtimes import runs_on_label
from quantatlas.web import landscape as land
from quantatlas.web.techniques import is_llamacpp_format, techniques

if TYPE_CHECKING:
    from quantatlas.atlas.ledger import Ledger

#: the list's result filter: a verdict, or "pending" (a spec waiting for runs)
ListResult = Literal[(*RESULTS, "pending")]
#: how the list may be grouped: by study (the same spec on several models: atlas/studies.py)
ListGroup = Literal["study"]
#: query parameters with a fixed set of values, as a 422 names them
QUERY_CHOICES: dict[str, tuple[str, ...]] = {"result": get_args(ListResult), "group": get_args(ListGroup),
                                             "bits": land.BITS_METRICS,
                                             "deployable": land.DEPLOYABLE, "frontier": land.FRONTIERS}
#: the landscape's model-family filter: an architecture name (atlas/architecture.py) or "unknown"; the form
#: sends family= for "any family"
FamilyFilter = Annotated[Optional[str], BeforeValidator(lambda v: v or None),
                         Query(max_length=64, pattern=ARCH_PATTERN.pattern,
                               description="only the plots of models of this family (architecture: qwen3, llama, "
                                           "qwen3_moe, ...; unknown: runs that recorded none)")]
#: the landscape's "deployable on" filter and what its Pareto frontier is drawn over
Deployable = Literal[land.DEPLOYABLE]
Frontier = Literal[land.FRONTIERS]

ECDF_POINTS = 400          # evenly spaced order statistics per arm, plus the upper tail below
ECDF_TAIL = 40             # log-spaced points in the top 1 %, so p99.9 and the max are on the curve
SEED_COLUMNS = ("kld_mean", "kld_se", "kld_median", "kld_p99", "kld_max", "same_top", "ppl_ratio",
                "bits_per_weight", "bits_per_param", "bytes_zstd",
                # mixture-of-experts runs: bits of the weights a token uses, and calibration coverage
                "active_bits_per_param", "moe_tokens_min", "moe_tokens_median", "moe_experts_under_threshold")
#: the MoE coverage columns, explained under the runs table where a run has them
MOE_COLUMNS = ("moe_tokens_min", "moe_tokens_median", "moe_experts_under_threshold")


def matches(row: dict, q: str) -> bool:
    """Case-insensitive substring search over a list row's id, title, hypothesis, model and tags."""
    needle = q.strip().lower()
    if not needle:
        return True
    hay = " ".join([row.get("id") or "", row.get("title") or "", row.get("hypothesis") or "",
                    row.get("model") or "", " ".join(row.get("tags") or [])]).lower()
    return all(word in hay for word in needle.split())


def experiment_rows(led: Ledger, tag: str | None = None, model: str | None = None, result: str | None = None,
                    q: str | None = None) -> list[dict]:
    """The list, newest first, filtered like `atlas list` plus a text search (`q`, all words)."""
    rows = led.rows(tag=tag or None, model=model or None, result=result or None)
    if q:
        rows = [r for r in rows if matches(r, q)]
    return rows[::-1]


def experiment_list(led: Ledger, tag: str | None = None, model: str | None = None, result: str | None = None,
                    q: str | None = None) -> list[dict]:
    """The list page's rows and /api/experiments: `experiment_rows`, where result "pending" is a
    spec waiting for runs (a hypothesis-only row is not pending: it has no spec to run)."""
    if result == "pending":
        return [r for r in experiment_rows(led, tag, model, None, q)
                if r["result"] is None and r.get("source") != "import"]
    return experiment_rows(led, tag, model, result, q)


def study_groups(led: Ledger, rows: list[dict]) -> list[dict]:
    """List rows grouped by study (their family hash: the same spec on other models), in the order of each
    group's first row: {"study": family hash or None (a row without one is a group of its own), "rows",
    "models": the models of its rows, "all_models": every model of the study, "holds": the study line over every
    model of the family (atlas/studies.py, whatever the filters left in `rows`) or None when only one model ran it}."""
    groups: dict[str, dict] = {}
    with led.read() as q:
        family = {e.id: e.family_hash for e in q.experiments()}
        for r in rows:
            fam = family.get(r["id"])
            groups.setdefault(fam or r["id"], {"study": fam, "rows": [], "holds": None})["rows"].append(r)
        for g in groups.values():
            g["models"] = g["all_models"] = [r.get("model") for r in g["rows"]]
            if g["study"] is not None:
                found = studies.study(q, led.verdict_cache, q.experiment(g["rows"][0]["id"]))
                if len(found["models"]) > 1:
                    g["holds"] = found["holds"]
                    g["all_models"] = [m["model"] for m in found["models"]]
    return list(groups.values())


def facets(led: Ledger) -> dict:
    """Values for the list's filter menus: every tag and model in the (unmerged) ledger."""
    rows = led.rows()
    return {"tags": sorted({t for r in rows for t in r.get("tags") or []}),
            "models": sorted({r["model"] for r in rows if r.get("model")})}


def ecdf(values: np.ndarray, n_points: int = ECDF_POINTS, n_tail: int = ECDF_TAIL) -> dict:
    """Points (x, F(x)) on the empirical CDF of `values`, F(x) = #{v <= x} / n exactly.

    x are order statistics: evenly spaced ranks, plus ranks log-spaced towards the maximum so
    the tail that dominates quantization error is drawn point by point. Non-finite values are
    counted and left out."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    v = np.sort(v[finite])
    n = v.size
    if n == 0:
        return {"x": [], "y": [], "n": 0, "nonfinite": int((~finite).sum())}
    ranks = np.rint(np.linspace(0, n - 1, min(n, n_points))).astype(np.int64)
    if n > n_points:
        top = n - 1 - np.rint(np.logspace(np.log10(max(1.0, 0.01 * n)), 0, n_tail) - 1).astype(np.int64)
        ranks = np.concatenate([ranks, top])
    x = np.unique(v[ranks])           # ties: one point per distinct value
    y = np.searchsorted(v, x, side="right") / n
    return {"x": x.tolist(), "y": y.tolist(), "n": int(n), "nonfinite": int((~finite).sum())}


def kld_distributions(runs: list[dict]) -> list[dict]:
    """Per run set (in the order given), per arm: the ECDF of per-token KLD pooled over seeds."""
    sets: dict[int, dict[str, list[np.ndarray]]] = {}
    seeds: dict[int, dict[str, list[int]]] = {}
    for r in runs:
        tok = r.get("per_token_kld")
        if tok is None:
            continue
        sets.setdefault(r["run_set"], {}).setdefault(r["arm"], []).append(tok)
        seeds.setdefault(r["run_set"], {}).setdefault(r["arm"], []).append(r["seed"])
    out = []
    for rs, arms in sets.items():
        out.append({"run_set": rs, "arms": [dict(ecdf(np.concatenate(parts)), arm=arm, seeds=sorted(seeds[rs][arm]))
                                            for arm, parts in arms.items()]})
    return out


def experiment_view(led: Ledger, exp_id: str) -> dict:
    """`Ledger.describe` plus each run set's full environment, each arm's techniques, and the
    per-token KLD distributions of each run set."""
    d = led.describe(exp_id)
    stored = {rs.id: rs for rs in led.run_sets(d["id"])}
    for i, rs in enumerate(d["run_sets"]):
        e = stored.get(rs["id"])
        rs["role"] = "primary" if i == 0 else "reproduction"
        rs["python"] = e.python if e else None
        rs["platform"] = e.platform if e else None
        rs["packages"] = (e.packages or {}) if e else {}
        rs["created_at"] = rs.get("created_at") or (isoformat(e.created_at) if e else None)
    recorded = arms_runs_on(d["run_sets"])
    ran = {r["arm"] for rs in d["run_sets"] for r in rs["runs"]}
    for a in d.get("arms_config") or []:
        a["runs_on"] = recorded.get(a["arm"])
        # "research format", the runtimes, or "not recorded" (runs stored before runs_on); None: no runs
        a["runs_on_label"] = runs_on_label(a["runs_on"]) if a["arm"] in ran else None
        a["compact"] = {k: v for k, v in (a["config"] or {}).items() if v not in (None, [], {}, False)}
        a["techniques"] = sorted(techniques(a["config"]))
        a["llamacpp"] = is_llamacpp_format(a["config"])
        a["made_by"] = artifact_provenance(a["config"])
    order = [rs["id"] for rs in d["run_sets"]]
    dists = kld_distributions(led.runs(d["id"]))
    d["kld_distributions"] = sorted(dists, key=lambda x: order.index(x["run_set"]) if x["run_set"] in order else 1e9)
    present = {k for rs in d["run_sets"] for r in rs["runs"] for k, v in r["metrics"].items() if v is not None}
    d["seed_columns"] = [c for c in SEED_COLUMNS if c in present]
    d["moe_coverage"] = any(c in present for c in MOE_COLUMNS)
    return d


def arms_runs_on(run_sets: list[dict]) -> dict[str, list]:
    """Arm -> the runs_on its runs recorded (quantatlas/runtimes.py; the primary run set's first, where
    several hold one: it follows from the arm, so they agree)."""
    out: dict[str, list] = {}
    for rs in run_sets:
        for r in rs["runs"]:
            extra = r.get("extra") or {}
            if "runs_on" in extra:
                out.setdefault(r["arm"], extra["runs_on"])
    return out


def artifact_provenance(config: dict | None) -> str | None:
    """"made by" line of an artifact arm (another tool's file): format, tool and version, scheme, content hash."""
    from quantatlas.quant.external.config import FORMAT_NAMES, FORMATS

    art = (config or {}).get("artifact")
    if not isinstance(art, dict):
        return None
    fmt = next((f for f in FORMATS if f in art), None)
    prov = art.get("provenance") if isinstance(art.get("provenance"), dict) else {}
    parts = [FORMAT_NAMES.get(fmt, "artifact"), " ".join(str(prov[k]) for k in ("tool", "version") if prov.get(k)),
             prov.get("scheme"), f"sha256 {art['sha256'][:12]}" if isinstance(art.get("sha256"), str) else None]
    return " · ".join(str(p) for p in parts if p)


def landscape_view(led: Ledger, bits: land.BitsMetric = "bits_per_weight", deployable: str = "any",
                   frontier: str = "all") -> dict:
    """KLD against `bits` per model hash × eval fingerprint, with the Pareto frontier (over every arm, or
    over the arms deployable on a runtime), the points filtered to those `deployable` on it."""
    return land.with_deployable(land.landscape(led, bits), deployable, frontier)


def composition_view(led: Ledger) -> dict:
    """Technique × technique: the verdicts of arms that stacked each pair."""
    return land.composition(led)


def left_to_try_view(led: Ledger) -> dict:
    """Compatible technique pairs and bit budgets not yet covered."""
    return land.left_to_try(led)


def sensitivity_view(led: Ledger, experiment: str | None = None) -> list[dict]:
    """Stored sensitivity measurements (of one experiment, by id or prefix; or all), newest first."""
    return led.sensitivities(experiment)
