"""The list and page views of the ledger: one row per experiment (what `atlas list` and the web
list show), everything `atlas show` prints, the short key-metrics cell and how the pages write a
metric. Read from the store and the verdict cache; writes nothing (stale verdicts are computed in
memory).

A row is one arm's: the experiment's result and confidence are its primary arm's verdict (the
spec's `primary:`, else the best treatment; verdict.choose_primary), and the key metrics are that
arm's. Reference arms (fp16, `reference: true`) never stand for an experiment."""
from __future__ import annotations

import math

from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.records import RESULTS, plain
from quantatlas.atlas.store import Reader, Store
from quantatlas.atlas.stored import StoredExperiment, StoredSpec, isoformat
from quantatlas.atlas.studies import study, study_members
from quantatlas.atlas.verdict import is_reference_arm
from quantatlas.atlas.verdict_cache import VerdictCache

KEY_METRICS = ("kld_mean", "kld_se", "kld_p99", "same_top", "ppl_ratio", "bits_per_weight", "bits_per_param",
               "bytes_zstd")


def rows(store: Store, cache: VerdictCache, tag: str | None = None, model: str | None = None,
         result: str | None = None, include_merged: bool = False) -> list[dict]:
    """The list: one row per experiment (id, hypothesis, result, confidence, reproductions,
    duplicate_of, key metrics), oldest first. Merged experiments are hidden unless asked."""
    if result is not None and result not in RESULTS:
        raise LedgerError(f"--result {result!r} is not one of {', '.join(RESULTS)}")
    with store.read() as q:
        out = [row(q, cache, e) for e in q.experiments(tag=tag, model=model, include_merged=include_merged)]
    if result is not None:
        out = [r for r in out if r["result"] == result]
    return out


def row(q: Reader, cache: VerdictCache, e: StoredExperiment) -> dict:
    """One experiment's list row; a hypothesis-only row shows the verdict of an experiment merged into it."""
    flag = q.best_duplicate(e.id)
    aliases = q.aliases(e.id)
    state = cache.state(q, e)
    result, confidence, via, summaries, spec = state["result"], state["confidence"], None, state["summaries"], e.spec
    primary_arm = state["primary"]
    if not summaries:
        for alias in aliases:
            a = q.experiment_or_none(alias)
            if not a.spec.present:
                continue
            st = cache.state(q, a)
            if st["result"] is not None:
                result, confidence, via, summaries, spec = st["result"], st["confidence"], a.id, \
                    st["summaries"], a.spec
                primary_arm = st["primary"]
                break
    metrics = q.arm_means(via or e.id, KEY_METRICS)
    if primary_arm is None:
        primary_arm = _unjudged_primary(spec, metrics)
    primary = next((v for v in summaries if v.get("arm") == primary_arm), None) or \
        ({"arm": primary_arm} if primary_arm else {})
    claim = (e.imported or {}).get("result") if not e.spec.present else None
    out = {
        "id": e.id, "title": e.title, "hypothesis": e.hypothesis, "result": result,
        "confidence": confidence, "result_via": via, "verdict_stale": state["stale"],
        "claim": claim, "claim_status": "imported claim, unverified" if claim else None,
        "primary": primary.get("arm"),
        "reproductions": primary.get("reproductions") if summaries else None,
        "reproductions_agree": primary.get("reproductions_agree") if summaries else None,
        "duplicate_of": flag.other_id if flag else None,
        "duplicate_score": flag.score if flag else None,
        "merged_into": e.merged_into, "aliases": list(aliases),
        "model": e.model, "tags": sorted(e.tags), "source": e.source,
        "contributed_tags": q.contributed_tags(e.id),
        "control": e.control, "criterion": e.spec.criterion.metric if e.spec.data else None,
        "arms": [{k: v.get(k) for k in ("arm", "result", "rule", "reference", "effect", "p_adjusted", "confidence",
                                        "bits_delta", "treatment_mean", "control_mean")} for v in summaries],
        "metrics": metrics,
    }
    if e.imported:
        out["imported"] = e.imported
        if out["reproductions"] is None:
            out["reproductions_column"] = e.imported.get("reproductions_column")
    out["key_metrics_parts"] = key_metric_parts(out, primary)
    out["key_metrics"] = key_metrics(out, primary)
    return out


def describe(store: Store, cache: VerdictCache, exp_id: str) -> dict:
    """Everything `atlas show` prints: the experiment, its arms, run sets with per-seed
    figures, verdicts with their reasoning, duplicate flags and aliases."""
    with store.read() as q:
        e = q.experiment(exp_id)
        state = cache.state(q, e)
        verdicts = [dict(v) for v in state["summaries"]]
        the_row = row(q, cache, e)
        runs_by_set: dict[int, list[dict]] = {}
        for r in q.runs(e.id):
            runs_by_set.setdefault(r.run_set.id, []).append(r.as_dict())
        run_sets = [{"id": rs.id, "contributor": rs.contributor, "hostname": rs.hostname, "device": rs.device,
                     "git_commit": rs.git_commit, "environment_key": rs.environment_key, "model_hash": rs.model_hash,
                     "eval_fingerprint": rs.eval_fingerprint, "created_at": isoformat(rs.created_at),
                     "runs": runs_by_set.get(rs.id, [])} for rs in q.run_sets(e.id)]
        details = state["details"]
        flags_out = [{"other": f.other_id, "score": f.score, "status": f.status} for f in q.duplicate_flags(e.id)]
        flags_in = [{"other": f.experiment_id, "score": f.score, "status": f.status} for f in q.duplicated_by(e.id)]
        arms_config = [{"arm": a.name, "config": a.config, "control": a.is_control} for a in q.arms_of(e.id)]
        # the same hypothesis on other models (a spec's `models:`): each model's verdict and the study line
        in_study = study(q, cache, e) if len(study_members(q, e)) > 1 else None
    return plain({
        **the_row, "notes": e.notes, "spec": e.spec.data, "created_at": isoformat(e.created_at),
        "contributor": e.contributor,
        "arms_config": arms_config,
        "run_sets": run_sets,
        "verdicts": [dict(v, details={k: x for k, x in (details.get(v["arm"]) or {}).items()
                                      if k != "summary"}) for v in verdicts],
        "duplicate_flags": flags_out, "duplicated_by": flags_in, "study": in_study,
    })


def _unjudged_primary(spec: StoredSpec, metrics: dict) -> str | None:
    """The arm a row shows before any verdict: the spec's `primary:`, else the first arm with metrics
    that is not a reference point."""
    if spec.primary:
        return spec.primary
    arms_cfg = spec.arms
    return next((a for a in metrics if not is_reference_arm(arms_cfg.get(a))), None)


def key_metric_parts(row: dict, shown: dict) -> dict | None:
    """The key-metrics cell in pieces: {"arm": the arm shown, "parts": ["KLD a vs b", "+x.x%", ...]}
    (the pages wrap between pieces, never inside one); None when the row has no metrics."""
    metrics = row["metrics"]
    if not metrics:
        return None
    arm = shown.get("arm") or next(iter(metrics))
    m = metrics.get(arm, {})
    judged = shown.get("result") not in (None, "baseline")
    parts = []
    if m.get("kld_mean") is not None:
        s = f"KLD {m['kld_mean']:.4g}"
        c = metrics.get(row.get("control") or "", {}).get("kld_mean")
        if judged and c is not None and arm != row.get("control"):
            s += f" vs {c:.4g}"
        parts.append(s)
    if shown.get("effect") is not None and judged:
        parts.append(f"{100 * shown['effect']:+.1f}%")
    if m.get("bits_per_param") is not None:
        bits = f"{m['bits_per_param']:.3f} bpp"
        d = shown.get("bits_delta")
        if d is not None and abs(d) > 0.001 and judged:
            bits += f" ({d:+.3f})"
        parts.append(bits)
    if m.get("ppl_ratio") is not None:
        parts.append(f"PPLr {format_metric('ppl_ratio', m['ppl_ratio'])}")
    return {"arm": arm, "parts": parts}


def key_metrics(row: dict, shown: dict) -> str:
    """A short metrics cell: the primary arm's figures, against the control when it was judged."""
    pieces = key_metric_parts(row, shown)
    if pieces is None:
        return (row.get("imported") or {}).get("metrics_column") or ""
    return f"{pieces['arm']}: " + ", ".join(pieces["parts"])


#: metrics written with fixed decimals: ratios near 1 (4 significant digits would hide 1.0004), bits
FIXED_DECIMALS = {"ppl_ratio": 4, "bits_per_weight": 3, "bits_per_param": 3, "kv_bits": 3, "act_bits": 3}
BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def human_bytes(n: float) -> str:
    """2081000 -> "2.08 MB" (decimal units, 3 significant digits)."""
    for scale, unit in BYTE_UNITS:
        if abs(n) >= scale:
            x = n / scale
            return f"{x:.{2 if abs(x) < 10 else 1 if abs(x) < 100 else 0}f} {unit}"
    return f"{n:.0f} B"


def format_metric(name: str, value) -> str:
    """A metric as the pages write it: bytes human-readable, ratios and bits to fixed decimals, the
    rest to 4 significant digits (scientific below 1e-4 and from 1e7)."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if name.startswith("bytes_") or name.endswith("_bytes"):
        return human_bytes(v)
    if name in FIXED_DECIMALS:
        return f"{v:.{FIXED_DECIMALS[name]}f}"
    if isinstance(value, int):
        return str(value)
    if v != 0 and (abs(v) >= 1e7 or abs(v) < 1e-4):
        return f"{v:.3e}"
    return f"{v:.4g}"


def measured_first(rows: list[dict]) -> list[dict]:
    """The rows with imported claims (hypothesis-only rows from another platform's listing) after the
    experiments of this atlas, each part in the order given."""
    return sorted(rows, key=lambda r: r.get("source") == "import")
