"""The ledger as a store (MLflow's tracking store is the model): sessions, registration, run
recording, sensitivity rows, contributor tokens, and the public queries the rest of the atlas
reads through. No other module opens a session or writes SQL against the ledger; imports no torch.

    store = Store(url)                          # None -> $QUANTATLAS_DB -> sqlite:///runs/atlas.db
    with store.read() as q:                     # one consistent snapshot
        exp = q.experiment("cexp_12ab")         # a StoredExperiment (by id or unique id prefix)
        runs = q.runs(exp.id)                   # [StoredRun]
    with store.write() as tx:                   # one transaction, committed when the block ends
        exp_id = tx.register(ids.normalise_spec(spec), "alice")
        tx.record(exp_id, "rtn4", 0, metrics, per_token, env, model_hash, eval_fingerprint, "alice")
        tx.add_tags(exp_id, "bob", ["gptq"])
        tx.merge(keep_id, other_id)
    store.transact(lambda tx: ...)              # the same, retried from scratch while the database is
                                                # busy or a concurrent writer inserted the same row first

Reads hand out `quantatlas.atlas.stored` snapshots, never rows attached to a session. A run is
never overwritten: recording the same arm × seed × environment × contributor × model × eval
tokens again returns the stored run's id, so a killed runner resumes and two runners racing on
one run keep one copy.

An experiment belongs to the atlas, not to whoever registers it again: registering (or
importing, or pushing) a spec the ledger holds changes neither its title, hypothesis, spec nor
tags; tags it brings are stored as that contributor's tags, beside the original ones.
"""
from __future__ import annotations

import getpass
import math
import os
from contextlib import contextmanager
from datetime import datetime
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from quantatlas.atlas import ids
from quantatlas.atlas.architecture import check_model_arch
from quantatlas.atlas.db import migrate, open_engines, resolve_url, write_transaction
from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.models import (ApiToken, Arm, ContributedTag, Contributor, DuplicateFlag, Environment,
                                     Experiment, Metric, Reproduction, Run, RunSet, SensitivityResult, Tag, Verdict,
                                     utcnow)
from quantatlas.atlas.records import RESULTS, encode_per_token, plain
from quantatlas.atlas.similarity import DUPLICATE_THRESHOLD, dice, trigrams
from quantatlas.atlas.stored import (RunCounts, StoredArm, StoredArmMeans, StoredExperiment, StoredFlag, StoredRun,
                                     StoredRunSet, StoredSpec, StoredToken, isoformat)
from quantatlas.spec import stable_arm_config

T = TypeVar("T")
IN_CHUNK = 2000             # ids per IN (...) query: under SQLite's bound-parameter limit


def default_contributor() -> str:
    name = os.environ.get("QUANTATLAS_CONTRIBUTOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "anonymous"


def _metric_rows(metrics: dict) -> tuple[list[tuple[str, float | None, str | None]], dict]:
    """Every number becomes a metric row (non-finite kept as text); anything else goes to `extra`."""
    if not isinstance(metrics, dict):
        raise LedgerError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    rows, extra = [], {}
    for name, v in metrics.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            extra[str(name)] = v if isinstance(v, (str, bool, type(None), list, dict)) else str(v)
            continue
        v = float(v)
        if math.isfinite(v):
            rows.append((str(name), v, None))
        else:
            rows.append((str(name), None, "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")))
    return rows, extra


def _text(v) -> str | None:
    return None if v is None else str(v)


def _finite_json(x):
    """JSON columns hold no inf/nan (PostgreSQL refuses them): null instead, nested too."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def _find_experiment(s: Session, exp_id: str) -> Experiment:
    """An experiment row by id or unique id prefix."""
    if not isinstance(exp_id, str) or not exp_id:
        raise LedgerError(f"experiment id must be a non-empty string, got {exp_id!r}")
    exp = s.get(Experiment, exp_id)
    if exp is not None:
        return exp
    like = exp_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    hits = s.scalars(select(Experiment).where(Experiment.id.like(like, escape="\\")).limit(3)).all()
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise LedgerError(f"experiment id {exp_id!r} is ambiguous: {', '.join(h.id for h in hits)}, ...")
    raise LedgerError(f"unknown experiment id {exp_id!r}")


def _runs_of(s: Session, exp_id: str) -> list[Run]:
    return list(s.scalars(select(Run).join(Arm, Run.arm_id == Arm.id).where(Arm.experiment_id == exp_id)
                          .order_by(Run.run_set_id, Arm.position, Run.seed)))


# a list of experiments loads its contributors in one query (tags as one experiment does)
_LOADS = (selectinload(Experiment.contributor),)


def _arm(a: Arm) -> StoredArm:
    return StoredArm(a.experiment_id, a.name, a.position, a.config, a.is_control)


def _experiment(e: Experiment) -> StoredExperiment:
    return StoredExperiment(
        id=e.id, spec_hash=e.spec_hash, family_hash=e.family_hash, title=e.title, hypothesis=e.hypothesis,
        notes=e.notes, model=e.model, control=e.control, spec=StoredSpec(e.spec), source=e.source,
        imported=e.imported, contributor=e.contributor.name if e.contributor else None, created_at=e.created_at,
        merged_into=e.merged_into, result=e.result, confidence=e.confidence, verdict_stamp=e.verdict_stamp,
        tags=tuple(t.name for t in e.tags))


def _flag(f: DuplicateFlag) -> StoredFlag:
    return StoredFlag(f.experiment_id, f.other_id, f.score, f.status)


def _token(t: ApiToken) -> StoredToken:
    return StoredToken(t.id, t.prefix, t.contributor.name, t.token_sha256, t.created_at, t.revoked_at)


class Reader:
    """The public queries, on one consistent snapshot (`Store.read()`; a `Transaction` reads its
    own writes). Everything returned is a `stored` snapshot or plain data."""

    def __init__(self, session: Session):
        self._s = session
        self._run_sets: dict[int, StoredRunSet] = {}

    # ---- experiments ------------------------------------------------------------------------

    def experiment(self, exp_id: str) -> StoredExperiment:
        """By id or unique id prefix; LedgerError when unknown or ambiguous."""
        return _experiment(_find_experiment(self._s, exp_id))

    def experiment_or_none(self, exp_id: str) -> StoredExperiment | None:
        """By exact id."""
        e = self._s.get(Experiment, exp_id)
        return None if e is None else _experiment(e)

    def experiment_with_spec(self, identity: dict) -> StoredExperiment | None:
        """The experiment registered with this spec (`ids.normalise_spec`'s identity part)."""
        e = self._s.scalars(select(Experiment).where(Experiment.spec_hash == ids.spec_hash(identity))).first()
        return None if e is None else _experiment(e)

    def experiments(self, tag: str | None = None, model: str | None = None,
                    include_merged: bool = True) -> list[StoredExperiment]:
        """Oldest first; only those with `tag` / on `model` when given."""
        q = select(Experiment).options(*_LOADS).order_by(Experiment.created_at, Experiment.id)
        if not include_merged:
            q = q.where(Experiment.merged_into.is_(None))
        if tag is not None:
            q = q.where(Experiment.id.in_(select(Tag.experiment_id).where(Tag.name == tag)))
        if model is not None:
            q = q.where(Experiment.model == model)
        return [_experiment(e) for e in self._s.scalars(q).all()]

    def experiments_with_specs(self, exp_ids: Iterable[str] | None = None) -> list[StoredExperiment]:
        """Experiments that have a spec: these (all when None) and every one of their families."""
        q = select(Experiment).options(*_LOADS).where(Experiment.spec.is_not(None))
        if exp_ids is not None:
            wanted = set(exp_ids)
            fams = set(self._s.scalars(select(Experiment.family_hash).where(Experiment.id.in_(wanted),
                                                                            Experiment.family_hash.is_not(None))))
            q = q.where(Experiment.id.in_(wanted) | Experiment.family_hash.in_(fams))
        return [_experiment(e) for e in self._s.scalars(q).all()]

    def siblings(self, exp: StoredExperiment) -> list[StoredExperiment]:
        """The other unmerged experiments of `exp`'s family (the same spec on other models)."""
        if exp.family_hash is None:
            return []
        return [_experiment(e) for e in self._s.scalars(select(Experiment).options(*_LOADS).where(
            Experiment.family_hash == exp.family_hash, Experiment.id != exp.id,
            Experiment.merged_into.is_(None))).all()]

    def arms_of(self, exp_id: str) -> list[StoredArm]:
        """The experiment's arms in spec order."""
        return [_arm(a) for a in self._s.scalars(select(Arm).where(Arm.experiment_id == exp_id)
                                                 .order_by(Arm.position)).all()]

    def aliases(self, exp_id: str) -> list[str]:
        """Ids of the experiments merged into this one, oldest first."""
        return list(self._s.scalars(select(Experiment.id).where(Experiment.merged_into == exp_id)
                                    .order_by(Experiment.created_at)).all())

    def contributed_tags(self, exp_id: str) -> dict[str, list[str]]:
        """Contributor -> the tags they added to the experiment (sorted)."""
        out: dict[str, list[str]] = {}
        for name, tag in self._s.execute(select(Contributor.name, ContributedTag.name)
                                         .join(Contributor, ContributedTag.contributor_id == Contributor.id)
                                         .where(ContributedTag.experiment_id == exp_id)
                                         .order_by(Contributor.name, ContributedTag.name)):
            out.setdefault(name, []).append(tag)
        return out

    # ---- duplicate flags --------------------------------------------------------------------

    def best_duplicate(self, exp_id: str) -> StoredFlag | None:
        """The experiment's closest possible duplicate; among equal scores the oldest experiment
        (the original, not a repeat)."""
        f = self._s.scalars(select(DuplicateFlag).join(Experiment, DuplicateFlag.other_id == Experiment.id)
                            .where(DuplicateFlag.experiment_id == exp_id)
                            .order_by(DuplicateFlag.score.desc(), Experiment.created_at, Experiment.id)).first()
        return None if f is None else _flag(f)

    def duplicate_flags(self, exp_id: str) -> list[StoredFlag]:
        """The experiment flagged as possibly duplicating others."""
        return [_flag(f) for f in self._s.scalars(select(DuplicateFlag).where(DuplicateFlag.experiment_id == exp_id))]

    def duplicated_by(self, exp_id: str) -> list[StoredFlag]:
        """Others flagged as possibly duplicating the experiment."""
        return [_flag(f) for f in self._s.scalars(select(DuplicateFlag).where(DuplicateFlag.other_id == exp_id))]

    def flags_of(self, exp_ids: Iterable[str]) -> list[StoredFlag]:
        """The duplicate flags these experiments carry, by experiment id."""
        return [_flag(f) for f in self._s.scalars(select(DuplicateFlag)
                                                  .where(DuplicateFlag.experiment_id.in_(set(exp_ids)))
                                                  .order_by(DuplicateFlag.experiment_id)).all()]

    # ---- runs -------------------------------------------------------------------------------

    def _run_set(self, rs: RunSet) -> StoredRunSet:
        got = self._run_sets.get(rs.id)
        if got is None:
            env = rs.environment
            got = self._run_sets[rs.id] = StoredRunSet(
                id=rs.id, experiment_id=rs.experiment_id, contributor=rs.contributor.name,
                environment_key=rs.environment_key, model_hash=rs.model_hash, eval_fingerprint=rs.eval_fingerprint,
                created_at=rs.created_at, hostname=env.hostname, device=env.device, git_commit=env.git_commit,
                python=env.python, platform=env.platform, packages=env.packages, environment=env.full,
                model_arch=rs.model_arch)
        return got

    def _run(self, r: Run) -> StoredRun:
        return StoredRun(id=r.id, experiment_id=r.arm.experiment_id, arm=r.arm.name, seed=r.seed,
                         run_set=self._run_set(r.run_set), created_at=r.created_at,
                         stored_metrics=tuple((m.name, m.value, m.nonfinite) for m in r.metrics),
                         extra=r.extra, n_tokens=r.n_tokens, per_token_zlib=r.per_token_kld,
                         per_token_sha256=r.per_token_sha256)

    def runs(self, exp_id: str) -> list[StoredRun]:
        """Every run of the experiment (exact id), by run set, arm and seed."""
        return [self._run(r) for r in _runs_of(self._s, exp_id)]

    def runs_by_id(self, run_ids: list[str]) -> list[StoredRun]:
        """The runs with these ids that the ledger holds, by experiment, run set, arm and seed."""
        out = []
        for i in range(0, len(run_ids), IN_CHUNK):
            q = (select(Run).join(Arm, Run.arm_id == Arm.id).where(Run.id.in_(run_ids[i:i + IN_CHUNK]))
                 .order_by(Arm.experiment_id, Run.run_set_id, Arm.position, Run.seed))
            out += [self._run(r) for r in self._s.scalars(q)]
        return out

    def run_ids(self) -> list[str]:
        return list(self._s.scalars(select(Run.id).order_by(Run.id)))

    def run_contributors(self) -> list[tuple[str, str]]:
        """(run id, contributor) of every run."""
        return [tuple(row) for row in self._s.execute(
            select(Run.id, Contributor.name).join(RunSet, Run.run_set_id == RunSet.id)
            .join(Contributor, RunSet.contributor_id == Contributor.id)).all()]

    def known(self, run_ids: list[str], experiment_ids: list[str]) -> dict[str, list[str]]:
        """Which of these run and experiment ids the ledger holds."""
        out = {"runs": [], "experiments": []}
        for key, column, asked in (("runs", Run.id, run_ids), ("experiments", Experiment.id, experiment_ids)):
            for i in range(0, len(asked), IN_CHUNK):
                out[key] += list(self._s.scalars(select(column).where(column.in_(asked[i:i + IN_CHUNK]))))
        return out

    def run_sets(self, exp_id: str) -> list[StoredRunSet]:
        """The experiment's run sets (exact id), oldest first."""
        return [self._run_set(rs) for rs in self._s.scalars(select(RunSet).where(RunSet.experiment_id == exp_id)
                                                             .order_by(RunSet.created_at, RunSet.id)).all()]

    def run_set_arches(self) -> list[tuple[str, str, str | None]]:
        """(experiment id, model hash, recorded architecture or None) of every run set
        (atlas/architecture.py: what a model's architecture is read from)."""
        return [tuple(r) for r in self._s.execute(select(RunSet.experiment_id, RunSet.model_hash,
                                                          RunSet.model_arch)).all()]

    def run_counts(self, exp_id: str, family_hash: str | None) -> RunCounts:
        """Runs of the experiment, and runs and experiments of its family (unmerged)."""
        s = self._s
        n_runs = s.execute(select(func.count(Run.id)).join(Arm, Run.arm_id == Arm.id)
                           .where(Arm.experiment_id == exp_id)).scalar()
        fam_runs = fam_exps = 0
        if family_hash is not None:
            fam_exps = s.execute(select(func.count(Experiment.id)).where(
                Experiment.family_hash == family_hash, Experiment.merged_into.is_(None))).scalar()
            fam_runs = s.execute(select(func.count(Run.id)).join(Arm, Run.arm_id == Arm.id)
                                 .join(Experiment, Arm.experiment_id == Experiment.id)
                                 .where(Experiment.family_hash == family_hash,
                                        Experiment.merged_into.is_(None))).scalar()
        return RunCounts(n_runs, fam_runs, fam_exps)

    def has_run(self, exp_id: str, arm: str, seed: int, environment_key: str, contributor: str) -> bool:
        q = (select(Run.id).join(Arm, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
             .join(Contributor, RunSet.contributor_id == Contributor.id)
             .where(Arm.experiment_id == exp_id, Arm.name == arm, Run.seed == int(seed),
                    RunSet.environment_key == environment_key, Contributor.name == contributor).limit(1))
        return self._s.execute(q).first() is not None

    def find_run(self, arm_config: dict, seed: int, environment_key: str | None, model_hash: str,
                 eval_fingerprint: str, calib: dict | None, contributor: str) -> StoredRun | None:
        """`contributor`'s oldest run of the same arm config and seed in any experiment (see
        `Store.find_run`)."""
        q = (select(Run).join(Arm, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
             .join(Contributor, RunSet.contributor_id == Contributor.id)
             .where(Run.seed == seed, RunSet.model_hash == model_hash,
                    RunSet.eval_fingerprint == eval_fingerprint, Contributor.name == contributor)
             .order_by(Run.created_at))
        if environment_key is not None:
            q = q.where(RunSet.environment_key == environment_key)
        for r in self._s.scalars(q):
            spec = r.arm.experiment.spec or {}
            if (stable_arm_config(r.arm.config or {}) == stable_arm_config(arm_config)
                    and (calib is None or (spec.get("data") or {}).get("calib") == calib)):
                return self._run(r)
        return None

    def arm_means(self, exp_id: str, names: Iterable[str]) -> dict[str, dict]:
        """Arm -> metric `names` averaged over the seeds of the experiment's first run set, and
        `n_seeds`; arms in position order."""
        s = self._s
        first = s.scalars(select(RunSet).where(RunSet.experiment_id == exp_id)
                          .order_by(RunSet.created_at, RunSet.id)).first()
        if first is None:
            return {}
        q = (select(Arm.name, Arm.position, Metric.name, func.avg(Metric.value), func.count(Metric.value))
             .join(Run, Run.arm_id == Arm.id).join(Metric, Metric.run_id == Run.id)
             .where(Run.run_set_id == first.id, Metric.name.in_(tuple(names)))
             .group_by(Arm.name, Arm.position, Metric.name).order_by(Arm.position))
        out: dict[str, dict] = {}
        for arm, _pos, name, mean, n in s.execute(q).all():
            d = out.setdefault(arm, {})
            d[name] = None if mean is None else float(mean)
            d["n_seeds"] = max(d.get("n_seeds", 0), int(n))
        return out

    def arm_metric_means(self, names: Iterable[str]) -> list[StoredArmMeans]:
        """Every arm with runs, per model hash × eval fingerprint: the mean of each metric in
        `names` over its runs there (None when missing or non-finite in any run)."""
        s = self._s
        q = (select(Arm.id, RunSet.model_hash, RunSet.eval_fingerprint, Metric.name, func.avg(Metric.value),
                    func.count(Metric.value), func.count(Metric.nonfinite))
             .join(Run, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
             .join(Metric, Metric.run_id == Run.id).where(Metric.name.in_(tuple(names)))
             .group_by(Arm.id, RunSet.model_hash, RunSet.eval_fingerprint, Metric.name))
        stats: dict[tuple, dict] = {}
        for arm_id, mh, ef, name, mean, _n, n_nonfinite in s.execute(q).all():
            stats.setdefault((arm_id, mh, ef), {})[name] = None if n_nonfinite or mean is None else float(mean)
        runs = s.execute(select(Run.arm_id, RunSet.model_hash, RunSet.eval_fingerprint, func.count(Run.id))
                         .join(RunSet, Run.run_set_id == RunSet.id)
                         .group_by(Run.arm_id, RunSet.model_hash, RunSet.eval_fingerprint)).all()
        arm_ids = {a for a, _, _, _ in runs}
        arms = {a.id: a for a in s.scalars(select(Arm).where(Arm.id.in_(arm_ids)))} if arm_ids else {}
        exps = {e.id: e for e in s.scalars(select(Experiment).where(
            Experiment.id.in_({a.experiment_id for a in arms.values()})))} if arms else {}
        out = []
        for arm_id, mh, ef, n_runs in runs:
            a = arms[arm_id]
            e = exps[a.experiment_id]
            out.append(StoredArmMeans(e.id, e.title, e.model, e.merged_into, a.name, a.is_control, a.config, mh, ef,
                                      int(n_runs), stats.get((arm_id, mh, ef), {})))
        return out

    def arm_runs_on(self) -> dict[tuple[str, str, str, str], list]:
        """(experiment id, arm, model hash, eval fingerprint) -> the `runs_on` its runs there recorded
        (quantatlas/runtimes.py: it follows from the arm, so its runs agree; the newest one's is kept).
        Arms whose runs were stored without one are absent."""
        q = (select(Arm.experiment_id, Arm.name, RunSet.model_hash, RunSet.eval_fingerprint, Run.extra)
             .join(Run, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
             .where(Run.extra.is_not(None)).order_by(Run.created_at, Run.id))
        out = {}
        for exp_id, arm, mh, ef, extra in self._s.execute(q).all():
            if isinstance(extra, dict) and "runs_on" in extra:
                out[(exp_id, arm, mh, ef)] = extra["runs_on"]
        return out

    def arms(self, include_merged: bool = True) -> list[StoredArm]:
        """Every registered arm (of unmerged experiments only, unless `include_merged`)."""
        q = select(Arm)
        if not include_merged:
            q = q.join(Experiment, Arm.experiment_id == Experiment.id).where(Experiment.merged_into.is_(None))
        return [_arm(a) for a in self._s.scalars(q).all()]

    # ---- cached verdicts --------------------------------------------------------------------

    def cached_verdicts(self, exp_id: str) -> list[tuple[str, dict]]:
        """(arm, details) of the experiment's stored verdicts, in the order they were stored."""
        rows = self._s.scalars(select(Verdict).where(Verdict.experiment_id == exp_id).order_by(Verdict.id)).all()
        return [(v.arm, v.details) for v in rows]

    # ---- sensitivity ------------------------------------------------------------------------

    def sensitivities(self, exp_id: str | None = None) -> list[dict]:
        """Stored sensitivity measurements (of one experiment, by id or prefix; or all), newest first."""
        q = select(SensitivityResult, Contributor.name).join(Contributor,
                                                              Contributor.id == SensitivityResult.contributor_id)
        if exp_id is not None:
            q = q.where(SensitivityResult.experiment_id == _find_experiment(self._s, exp_id).id)
        out = []
        for r, who in self._s.execute(q.order_by(SensitivityResult.id.desc())).all():
            out.append({"id": r.id, "experiment_id": r.experiment_id, "arm": r.arm, "seed": r.seed,
                        "contributor": who, "model_hash": r.model_hash, "base": r.base, "grouping": r.grouping,
                        "kld_base": r.kld_base, "calib_tokens": r.calib_tokens,
                        "forward_passes": r.forward_passes, "rows": r.rows, "data": r.data,
                        "created_at": isoformat(r.created_at)})
        return out

    # ---- tokens -----------------------------------------------------------------------------

    def token_owner(self, token_sha256: str) -> str | None:
        """The contributor of the live token with this sha256, or None."""
        row = self._s.execute(select(Contributor.name).join(ApiToken, ApiToken.contributor_id == Contributor.id)
                              .where(ApiToken.token_sha256 == token_sha256, ApiToken.revoked_at.is_(None))).first()
        return None if row is None else row[0]

    def tokens(self) -> list[StoredToken]:
        """Every token, oldest first."""
        return [_token(t) for t in self._s.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id))]


class Transaction(Reader):
    """One write transaction (`Store.write()` / `Store.transact`): the writes, and every query
    of `Reader` seeing them."""

    def __init__(self, session: Session, grams: dict[str, frozenset]):
        super().__init__(session)
        self._grams = grams

    # ---- experiments ------------------------------------------------------------------------

    def register(self, normal: tuple[dict, dict], contributor: str | None = None, *, given_id: str | None = None,
                 created_at: datetime | None = None) -> str:
        """The experiment of a spec, `normal` = `ids.normalise_spec(spec)` (full, identity): a new
        row (id `given_id` when free, else `cexp_` + the spec hash), or the stored one left as it
        is (tags the spec adds become `contributor`'s tags)."""
        s = self._s
        full, identity = normal
        h = ids.spec_hash(identity)
        old = s.scalars(select(Experiment).where(Experiment.spec_hash == h)).first()
        if old is not None:
            self._add_tags(old, contributor, full.get("tags") or [])
            return old.id
        exp_id = given_id if given_id and s.get(Experiment, given_id) is None else None
        digits = ids.ID_HEX_DIGITS
        while exp_id is None:
            candidate = ids.experiment_id(h, digits)
            if s.get(Experiment, candidate) is None:
                exp_id = candidate
            digits += 2
        control = full.get("control")
        exp = Experiment(id=exp_id, spec_hash=h, family_hash=ids.family_hash(identity),
                         title=(full.get("title") or "").strip(), hypothesis=(full.get("hypothesis") or "").strip(),
                         notes=full.get("notes"), model=full.get("model"), control=control, spec=full,
                         source="spec", contributor=self._contributor(contributor) if contributor else None)
        if created_at is not None:
            exp.created_at = created_at
        exp.tags = [Tag(name=t) for t in dict.fromkeys(full.get("tags") or [])]
        exp.arms = [Arm(name=name, position=i, config=cfg, is_control=(name == control))
                    for i, (name, cfg) in enumerate((full.get("arms") or {}).items())]
        s.add(exp)
        s.flush()
        self._flag_duplicates(exp)
        return exp_id

    def add_hypothesis(self, exp_id: str, hypothesis: str, result: str | None, title: str = "",
                       tags: list[str] | None = None, imported: dict | None = None,
                       created_at: datetime | None = None, contributor: str | None = None) -> bool:
        """A hypothesis-only row (e.g. from another platform's listing), keeping its id. False
        when the id is already in the ledger."""
        s = self._s
        if s.get(Experiment, exp_id) is not None:
            return False
        if result is not None and result not in RESULTS:
            raise LedgerError(f"result {result!r} is not one of {', '.join(RESULTS)}")
        # a result the row states is an imported claim: kept in `imported`, never the verdict
        exp = Experiment(id=exp_id, title=(title or "").strip(), hypothesis=(hypothesis or "").strip(), source="import",
                         imported=dict(imported or {}, result=result), result=None,
                         contributor=self._contributor(contributor) if contributor else None)
        if created_at is not None:
            exp.created_at = created_at
        exp.tags = [Tag(name=t) for t in dict.fromkeys(tags or [])]
        s.add(exp)
        s.flush()
        self._flag_duplicates(exp)
        return True

    def add_tags(self, exp_id: str, contributor: str | None, tags: Iterable[str]) -> list[str]:
        """Store `tags` that the experiment (exact id) lacks as `contributor`'s tags (never its
        original tags). The tags added."""
        exp = self._s.get(Experiment, exp_id)
        if exp is None:
            raise LedgerError(f"unknown experiment id {exp_id!r}")
        return self._add_tags(exp, contributor, tags)

    def _add_tags(self, exp: Experiment, contributor: str | None, tags: Iterable[str]) -> list[str]:
        if not contributor:
            return []
        have = {t.name for t in exp.tags}
        new = [t for t in dict.fromkeys(tags) if t not in have]
        if not new:
            return []
        s = self._s
        who = self._contributor(contributor)
        mine = set(s.scalars(select(ContributedTag.name).where(ContributedTag.experiment_id == exp.id,
                                                               ContributedTag.contributor_id == who.id)))
        added = [t for t in new if t not in mine]
        for t in added:
            s.add(ContributedTag(experiment_id=exp.id, contributor_id=who.id, name=t))
        s.flush()
        return added

    def _trigrams(self, exp_id: str, text: str) -> frozenset:
        key = f"{exp_id}\0{text}"
        if key not in self._grams:
            self._grams[key] = trigrams(text)
        return self._grams[key]

    def _flag_duplicates(self, exp: Experiment) -> None:
        """Flag `exp` as a possible duplicate of every earlier experiment whose hypothesis is
        near-identical (similarity >= DUPLICATE_THRESHOLD), except the same spec on another
        model (same family), which is a sibling, not a duplicate."""
        if not (exp.hypothesis or "").strip():
            return
        s = self._s
        mine = self._trigrams(exp.id, exp.hypothesis)
        others = s.execute(select(Experiment.id, Experiment.hypothesis, Experiment.family_hash)
                           .where(Experiment.id != exp.id, Experiment.merged_into.is_(None))).all()
        for other_id, text, fam in others:
            if exp.family_hash is not None and fam == exp.family_hash:
                continue
            score = dice(mine, self._trigrams(other_id, text or ""))
            if score >= DUPLICATE_THRESHOLD and s.get(DuplicateFlag, (exp.id, other_id)) is None \
                    and s.get(DuplicateFlag, (other_id, exp.id)) is None:
                s.add(DuplicateFlag(experiment_id=exp.id, other_id=other_id, score=round(score, 4)))

    def _contributor(self, name: str) -> Contributor:
        s = self._s
        c = s.scalars(select(Contributor).where(Contributor.name == name)).first()
        if c is None:
            c = Contributor(name=name)
            s.add(c)
            s.flush()
        return c

    def merge(self, keep: str, other: str) -> dict:
        """Merge experiment `other` into `keep` (ids or unique prefixes): `other` becomes an alias
        that the list hides; its tags join `keep`'s; its runs stay with its own spec.
        {"kept", "merged", "similarity"}."""
        s = self._s
        a, b = _find_experiment(s, keep), _find_experiment(s, other)
        if a.id == b.id:
            raise LedgerError(f"cannot merge {a.id} into itself")
        if a.merged_into is not None:
            raise LedgerError(f"{a.id} is itself merged into {a.merged_into}; merge into {a.merged_into}")
        if b.merged_into is not None:
            raise LedgerError(f"{b.id} is already merged into {b.merged_into}")
        b.merged_into = a.id
        b.verdict_stamp = None
        for c in s.scalars(select(Experiment).where(Experiment.merged_into == b.id)).all():
            c.merged_into = a.id
        have = {t.name for t in a.tags}
        for t in b.tags:
            if t.name not in have:
                a.tags.append(Tag(name=t.name))
                have.add(t.name)
        flag = s.get(DuplicateFlag, (b.id, a.id)) or s.get(DuplicateFlag, (a.id, b.id))
        score = round(dice(trigrams(a.hypothesis), trigrams(b.hypothesis)), 4)
        if flag is None:
            flag = DuplicateFlag(experiment_id=b.id, other_id=a.id, score=score)
            s.add(flag)
        flag.status = "merged"
        a.verdict_stamp = None
        s.flush()
        return {"kept": a.id, "merged": b.id, "similarity": score}

    # ---- runs -------------------------------------------------------------------------------

    def record(self, exp_id: str, arm: str, seed: int, metrics: dict, per_token_kld: np.ndarray | None,
               environment: dict, model_hash: str, eval_fingerprint: str, contributor: str,
               created_at: datetime | None = None, extra: dict | None = None) -> tuple[str, bool]:
        """Store one finished arm × seed of the experiment (exact id): (run id, whether it is new).
        A run stored before is left as it is."""
        s = self._s
        exp = s.get(Experiment, exp_id)
        if exp is None:
            raise LedgerError(f"unknown experiment id {exp_id!r}")
        arm_row = s.scalars(select(Arm).where(Arm.experiment_id == exp_id, Arm.name == arm)).first()
        if arm_row is None:
            names = ", ".join(a.name for a in exp.arms) or "none"
            raise LedgerError(f"experiment {exp_id} has no arm {arm!r} (arms: {names})")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise LedgerError(f"seed must be an integer, got {seed!r}")
        for what, v in (("model_hash", model_hash), ("eval_fingerprint", eval_fingerprint)):
            if not isinstance(v, str) or not v:
                raise LedgerError(f"{what} must be a non-empty string, got {v!r}")
        env_key = ids.environment_key(environment)
        rid = ids.run_id(exp_id, arm, int(seed), env_key, contributor, model_hash, eval_fingerprint)
        if s.get(Run, rid) is not None:
            return rid, False
        rows, loose = _metric_rows(metrics)
        extra = {**loose, **(extra or {})}
        arch = extra.get("model_arch")     # the model's architecture, stored on the run set (architecture.py)
        if arch is not None:
            try:
                check_model_arch(arch)
            except ValueError as e:
                raise LedgerError(str(e)) from None
        blob = digest = n_tokens = None
        if per_token_kld is not None:
            values = np.asarray(per_token_kld)
            if values.ndim != 1:
                raise LedgerError(f"per_token_kld must be 1-D (one value per scored token), got shape {values.shape}")
            blob, digest, n_tokens = encode_per_token(values)
            known = s.execute(select(Run.n_tokens).join(Arm, Run.arm_id == Arm.id)
                              .join(RunSet, Run.run_set_id == RunSet.id)
                              .where(Arm.experiment_id == exp_id, RunSet.model_hash == model_hash,
                                     RunSet.eval_fingerprint == eval_fingerprint, Run.n_tokens.is_not(None))
                              .limit(1)).scalar()
            if known is not None and known != n_tokens:
                raise LedgerError(f"per_token_kld has {n_tokens} tokens but runs of {exp_id} on the same model "
                                  f"and eval fingerprint have {known}")
        if s.get(Environment, env_key) is None:
            s.add(Environment(key=env_key, device=_text(environment.get("device")),
                              hostname=_text(environment.get("hostname")),
                              git_commit=_text(environment.get("git_commit")), python=_text(environment.get("python")),
                              platform=_text(environment.get("platform")), packages=environment.get("packages"),
                              full=plain(environment)))
            s.flush()
        who = self._contributor(contributor)
        rs = s.scalars(select(RunSet).where(RunSet.experiment_id == exp_id, RunSet.environment_key == env_key,
                                            RunSet.contributor_id == who.id, RunSet.model_hash == model_hash,
                                            RunSet.eval_fingerprint == eval_fingerprint)).first()
        if rs is None:
            rs = RunSet(experiment_id=exp_id, environment_key=env_key, contributor_id=who.id, model_hash=model_hash,
                        eval_fingerprint=eval_fingerprint)
            if created_at is not None:
                rs.created_at = created_at
            s.add(rs)
            s.flush()
        if arch is not None and rs.model_arch != arch:
            if rs.model_arch is not None:
                raise LedgerError(f"model_arch {arch!r}: the run set's model (hash {model_hash}) was recorded as "
                                  f"{rs.model_arch!r}")
            rs.model_arch = arch      # a run set stored before architectures were recorded learns its own
        run = Run(id=rid, arm_id=arm_row.id, run_set_id=rs.id, seed=int(seed), n_tokens=n_tokens,
                  per_token_kld=blob, per_token_sha256=digest, extra=extra or None)
        if created_at is not None:
            run.created_at = created_at
        run.metrics = [Metric(name=n, value=v, nonfinite=nf) for n, v, nf in rows]
        s.add(run)
        s.flush()
        return rid, True

    def record_sensitivity(self, exp_id: str, arm: str, seed: int, sens: dict, rows: list[dict], model_hash: str,
                           contributor: str) -> int:
        """Store one sensitivity measurement (quant/sensitivity.py: `Sensitivity.to_dict()` and its
        ROI `rows`) of an arm × calibration seed; a repeat by the same contributor replaces it."""
        s = self._s
        exp = _find_experiment(s, exp_id)
        who = self._contributor(contributor)
        grouping = str(sens["grouping"])
        old = s.scalars(select(SensitivityResult).where(
            SensitivityResult.experiment_id == exp.id, SensitivityResult.arm == arm,
            SensitivityResult.seed == int(seed), SensitivityResult.contributor_id == who.id,
            SensitivityResult.model_hash == model_hash, SensitivityResult.grouping == grouping)).first()
        if old is not None:
            s.delete(old)
            s.flush()
        row = SensitivityResult(experiment_id=exp.id, arm=arm, seed=int(seed), contributor_id=who.id,
                                model_hash=model_hash, base=str(sens["base"])[:300], grouping=grouping,
                                kld_base=float(sens["kld_base"]), calib_tokens=int(sens["calib_tokens"]),
                                forward_passes=int(sens["forward_passes"]), rows=_finite_json(rows),
                                data=_finite_json(sens))
        s.add(row)
        s.flush()
        return row.id

    # ---- cached verdicts --------------------------------------------------------------------

    def replace_verdicts(self, exp_id: str, verdicts: list[dict], reproductions: list[dict], result: str | None,
                         confidence: float | None, stamp: str) -> None:
        """Replace the experiment's cached verdicts (column values of `models.Verdict`, and of
        `models.Reproduction`) and its experiment-level result, stamped `stamp`."""
        s = self._s
        exp = s.get(Experiment, exp_id)
        for old in s.scalars(select(Verdict).where(Verdict.experiment_id == exp_id)).all():
            s.delete(old)
        for old in s.scalars(select(Reproduction).where(Reproduction.experiment_id == exp_id)).all():
            s.delete(old)
        s.flush()
        for v in verdicts:
            s.add(Verdict(experiment_id=exp_id, **v))
        for r in reproductions:
            s.add(Reproduction(experiment_id=exp_id, **r))
        exp.result, exp.confidence = result, confidence
        exp.verdict_stamp = stamp

    # ---- tokens -----------------------------------------------------------------------------

    def add_token(self, contributor: str, token_sha256: str, prefix: str) -> None:
        """A token for `contributor` (created if new), stored as its sha256 and first characters."""
        who = self._contributor(contributor)
        self._s.add(ApiToken(contributor_id=who.id, token_sha256=token_sha256, prefix=prefix))

    def live_tokens(self, prefix: str) -> list[StoredToken]:
        """The tokens not revoked whose stored prefix starts with `prefix`."""
        return [_token(t) for t in self._s.scalars(select(ApiToken).where(
            ApiToken.prefix.startswith(prefix, autoescape=True), ApiToken.revoked_at.is_(None))).all()]

    def revoke_token(self, token_id: int) -> str:
        """Revoke a token (it stops working at once); its contributor."""
        t = self._s.get(ApiToken, token_id)
        if t is None:
            raise LedgerError(f"no token with id {token_id}")
        t.revoked_at = utcnow()
        return t.contributor.name


class Store:
    """One ledger database. `url`: a SQLAlchemy URL (None: $QUANTATLAS_DB, else
    sqlite:///runs/atlas.db); the schema is migrated on open. `contributor`: who records runs
    (default $QUANTATLAS_CONTRIBUTOR, else the login name). `engine` is the write engine."""

    def __init__(self, url: str | None = None, contributor: str | None = None):
        self.url = resolve_url(url)
        self.engine, self._read_engine, self.dialect = open_engines(self.url)
        migrate(self.engine, self._read_engine)
        self.contributor = contributor or default_contributor()
        self._grams: dict[str, frozenset] = {}

    def close(self) -> None:
        self.engine.dispose()
        if self._read_engine is not self.engine:
            self._read_engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- sessions ---------------------------------------------------------------------------

    def _reading(self) -> Session:
        return Session(self._read_engine, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Reader]:
        """One consistent snapshot to query (writes nothing)."""
        with self._reading() as s:
            yield Reader(s)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """One write transaction, committed when the block ends and rolled back on an exception.
        Not retried: `transact` retries a write that may race with another writer."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield Transaction(s, self._grams)

    def transact(self, fn: Callable[[Transaction], T]) -> T:
        """`fn(tx)` in one write transaction, committed on return; run again from scratch while
        the database is busy (SQLite) or when a concurrent writer inserted the same row first."""
        return write_transaction(self.engine, lambda s: fn(Transaction(s, self._grams)))

    # ---- one-call writes --------------------------------------------------------------------

    def register_experiment(self, spec: dict, contributor: str | None = None) -> str:
        """The experiment's id (`cexp_` + hex of the normalised spec without free text). An
        identical spec registered before keeps its id and row (its tags are merged in).
        `contributor`, when given, also records this ledger's later runs."""
        if contributor:
            self.contributor = contributor
        normal = ids.normalise_spec(spec)
        return self.transact(lambda tx: tx.register(normal, self.contributor))

    def add_hypothesis(self, exp_id: str, hypothesis: str, result: str | None = None, title: str = "",
                       tags: list[str] | None = None, imported: dict | None = None) -> bool:
        """A hypothesis-only row (e.g. from another platform's listing), keeping its id.
        False when the id is already in the ledger."""
        return self.transact(lambda tx: tx.add_hypothesis(exp_id, hypothesis, result, title, tags, imported))

    def record_sensitivity(self, exp_id: str, arm: str, seed: int, sens: dict, rows: list[dict],
                           model_hash: str) -> int:
        """Store one sensitivity measurement of an arm × calibration seed as this contributor
        (see `Transaction.record_sensitivity`)."""
        return self.transact(lambda tx: tx.record_sensitivity(exp_id, arm, seed, sens, rows, model_hash,
                                                              self.contributor))

    # ---- one-call reads ---------------------------------------------------------------------

    def resolve(self, exp_id: str) -> str:
        """The full id of an experiment id or unique prefix."""
        with self.read() as q:
            return q.experiment(exp_id).id

    def spec(self, exp_id: str) -> dict:
        with self.read() as q:
            exp = q.experiment(exp_id)
        if not exp.spec.present:
            raise LedgerError(f"experiment {exp.id} is a hypothesis-only row: it has no spec to run")
        return dict(exp.spec.data)

    def has_run(self, exp_id: str, arm: str, seed: int, environment_key: str, contributor: str | None = None) -> bool:
        """Whether arm × seed of the experiment is recorded from this environment by this contributor."""
        with self.read() as q:
            return q.has_run(exp_id, arm, seed, environment_key, contributor or self.contributor)

    def runs(self, exp_id: str) -> list[dict]:
        """Every run of an experiment, oldest first, with metrics (and per-token KLD arrays)."""
        with self.read() as q:
            return [r.as_dict(tokens=True) for r in q.runs(q.experiment(exp_id).id)]

    def find_run(self, arm_config: dict, seed: int, environment_key: str | None, model_hash: str,
                 eval_fingerprint: str, calib: dict | None) -> dict | None:
        """This contributor's run of the same arm config and seed in any experiment, made in the same
        environment (None: any) on the same model, eval tokens and calibration data (the spec's
        `data.calib`; None: any, for an arm that reads none): what a changed spec (an arm added, a
        hypothesis reworded) reuses instead of running again."""
        with self.read() as q:
            run = q.find_run(arm_config, seed, environment_key, model_hash, eval_fingerprint, calib, self.contributor)
            return None if run is None else run.as_dict(tokens=True)

    def run_sets(self, exp_id: str) -> list[StoredRunSet]:
        """The experiment's run sets (id or prefix), oldest first, with their environments."""
        with self.read() as q:
            return q.run_sets(q.experiment(exp_id).id)

    def sensitivities(self, exp_id: str | None = None) -> list[dict]:
        """Stored sensitivity measurements (of one experiment, or all), newest first."""
        with self.read() as q:
            return q.sensitivities(exp_id)
