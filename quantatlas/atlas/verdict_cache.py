"""The verdict cache: each experiment's verdicts (verdict.py) computed from its runs and stored
beside them, with a stamp of what they saw.

    cache = VerdictCache(store)
    cache.verdicts(exp_id)          # one dict per arm with runs
    cache.refresh([exp_id])         # recompute and store where stale (after runs were written)

A stamp is STATS_VERSION and the run counts of the experiment and of its family (the same spec
on other models: their results feed "holds on k of n models"). Stored verdicts are used while the
stamp matches. Reads never write: a stale experiment is computed in memory and not stored; the
cache is refreshed when runs are written (`Ledger.record_run`, `import_lines`, `merge`; the web
app after each push).
"""
from __future__ import annotations

from typing import Iterable

from quantatlas.atlas.records import plain
from quantatlas.atlas.store import Reader, Store, Transaction
from quantatlas.atlas.stored import StoredExperiment
from quantatlas.atlas.verdict import (ArmJudgement, FinalVerdict, RunSetInfo, SeedRun, choose_primary,
                                      combine_run_sets, experiment_result, is_reference_arm, judge_run_set)
from quantatlas.spec import Criterion

STATS_VERSION = "4"          # bump when verdict statistics change: cached verdicts are recomputed
# 3: whether an arm is seeded and whether it is a reference arm come from its steps (quant/steps/)
# 4: one meaning of confidence (confidence.py); reference arms are never judged; the experiment's
#    result and confidence are its primary arm's; verdict texts name the side that depends on the seed


class VerdictCache:
    def __init__(self, store: Store):
        self.store = store

    def stamp(self, q: Reader, exp: StoredExperiment) -> str:
        n_runs, fam_runs, fam_exps = q.run_counts(exp.id, exp.family_hash)
        return f"{STATS_VERSION}:{n_runs}:{fam_runs}:{fam_exps}"

    def is_current(self, q: Reader, exp: StoredExperiment) -> bool:
        return exp.verdict_stamp == self.stamp(q, exp)

    def judge(self, q: Reader, exp: StoredExperiment
              ) -> tuple[Criterion, list[str], list[tuple[RunSetInfo, dict[str, ArmJudgement]]]]:
        """(criterion, arm order, per run set oldest first: (RunSetInfo, {arm: ArmJudgement}))."""
        crit = exp.spec.criterion
        order = [a.name for a in q.arms_of(exp.id)]
        sets: dict[int, dict[str, dict[int, SeedRun]]] = {}
        infos: dict[int, RunSetInfo] = {}
        created = {}
        for r in q.runs(exp.id):
            rs = r.run_set
            if rs.id not in infos:
                host = rs.hostname or "?"
                infos[rs.id] = RunSetInfo(rs.id, ((host, rs.device or "?"), rs.contributor), f"{rs.contributor}@{host}")
                created[rs.id] = rs.created_at
            sets.setdefault(rs.id, {}).setdefault(r.arm, {})[r.seed] = SeedRun(r.seed, r.metrics, r.per_token())
        ordered = sorted(infos.values(), key=lambda i: (created[i.id], i.id))
        judged = [(info, judge_run_set(sets[info.id], order, exp.control, crit, exp.spec)) for info in ordered]
        return crit, order, judged

    def compute(self, q: Reader, exp: StoredExperiment) -> tuple[list[FinalVerdict], Criterion]:
        """Every arm's final verdict over its run sets and the models of its family."""
        crit, order, judged = self.judge(q, exp)
        siblings: dict[str, list[str]] = {a: [] for a in order}
        for sib in q.siblings(exp):
            scrit, sorder, sjudged = self.judge(q, sib)
            for a in sorder:
                fv = combine_run_sets(sjudged, a, scrit, [])
                if fv is not None and a in siblings:
                    siblings[a].append(fv.result)
        finals = [fv for a in order if (fv := combine_run_sets(judged, a, crit, siblings[a])) is not None]
        return finals, crit

    def state(self, q: Reader, exp: StoredExperiment) -> dict:
        """The experiment's verdicts (summaries, details per arm, result, confidence, the primary arm
        they are, stale): from the cache while it is current, else computed in memory and not stored
        (reads never write)."""
        if not exp.spec.present:
            return {"summaries": [], "details": {}, "result": exp.result, "confidence": exp.confidence,
                    "primary": None, "stale": False}
        if self.is_current(q, exp):
            rows = q.cached_verdicts(exp.id)
            summaries = [plain(details["summary"]) for _, details in rows]
            picked = choose_primary(summaries, exp.spec.primary, exp.spec.criterion.lower_is_better)
            return {"summaries": summaries, "details": {arm: plain(details) for arm, details in rows},
                    "result": exp.result, "confidence": exp.confidence,
                    "primary": picked["arm"] if picked and exp.result is not None else None, "stale": False}
        finals, crit = self.compute(q, exp)
        result, confidence, pick = experiment_result(finals, _has_treatments(q, exp), exp.spec.primary, crit)
        summaries = [plain(fv.as_dict(crit)) for fv in finals]
        details = {fv.arm: plain({"summary": fv.as_dict(crit), **fv.details()}) for fv in finals}
        return {"summaries": summaries, "details": details, "result": result, "confidence": confidence,
                "primary": pick.arm if pick is not None and result is not None else None, "stale": True}

    def verdicts(self, exp_id: str) -> list[dict]:
        """One dict per arm with runs (treatments, and the control as 'baseline'): result, p_value,
        p_adjusted, effect, ci, confidence, text, bits_delta, reproductions, ..."""
        with self.store.read() as q:
            exp = q.experiment(exp_id)
            if not exp.spec.present:
                return []
            return [dict(v) for v in self.state(q, exp)["summaries"]]

    def refresh(self, exp_ids: Iterable[str] | None = None) -> list[str]:
        """Recompute and store the verdicts of these experiments and of their families' (all
        experiments when None) where they are stale; one write transaction each. The ids refreshed."""
        with self.store.read() as q:
            stale = [e.id for e in q.experiments_with_specs(exp_ids) if not self.is_current(q, e)]
        done = []
        for exp_id in stale:
            # the statistics are computed in a read session: the write lock is held only to store them
            with self.store.read() as q:
                exp = q.experiment_or_none(exp_id)
                stamp = self.stamp(q, exp)
                finals, crit = self.compute(q, exp)
                has_treatments = _has_treatments(q, exp)
            if self.store.transact(lambda tx, e=exp: self._store(tx, e, finals, crit, has_treatments, stamp)):
                done.append(exp_id)
        return done

    def _store(self, tx: Transaction, exp: StoredExperiment, finals: list[FinalVerdict], crit: Criterion,
               has_treatments: bool, stamp: str) -> bool:
        """Store computed verdicts as the cache, unless runs arrived since they were computed
        (then the refresh those runs start stores theirs)."""
        if self.stamp(tx, exp) != stamp:
            return False
        verdicts, reproductions = [], []
        for fv in finals:
            j = fv.primary
            verdicts.append(dict(arm=fv.arm, control=fv.control, result=fv.result, p_value=j.p_value,
                                 p_adjusted=j.p_adjusted, effect=j.effect, ci_low=j.ci[0] if j.ci else None,
                                 ci_high=j.ci[1] if j.ci else None, confidence=fv.confidence,
                                 bits_delta=j.bits_delta, text=fv.text,
                                 details=plain({"summary": fv.as_dict(crit), **fv.details()})))
            for rs, rj, agree, independent in fv.reproductions:
                reproductions.append(dict(run_set_id=rs.id, arm=fv.arm, result=rj.result, agrees=agree,
                                          independent=independent))
        result, confidence, _ = experiment_result(finals, has_treatments, exp.spec.primary, crit)
        tx.replace_verdicts(exp.id, verdicts, reproductions, result, confidence, stamp)
        return True


def _has_treatments(q: Reader, exp: StoredExperiment) -> bool:
    """Whether the experiment has an arm to judge: not the control, not a reference arm."""
    return exp.control is not None and any(a.name != exp.control and not is_reference_arm(a.config)
                                           for a in q.arms_of(exp.id))
