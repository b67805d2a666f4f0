"""The ledger API: register experiments, record runs (one transaction each), verdicts, rows
for the list, merges. Used by the runner, the CLI and the web app; imports no torch.

    led = Ledger(url)                       # None -> $QUANTATLAS_DB -> sqlite:///runs/atlas.db
    exp_id = led.register_experiment(spec_dict, contributor=None)
    if not led.has_run(exp_id, arm, seed, environment_key(env)):
        led.record_run(exp_id, arm, seed, metrics, per_token_kld, env, model_hash, eval_fingerprint)
    led.verdicts(exp_id)

A run is committed in its own transaction and is never overwritten: recording the same
arm × seed × environment × contributor × model × eval tokens again returns the stored run's
id, so a killed runner resumes and two runners racing on one run keep one copy.

Reads never write: `rows`, `verdicts` and `describe` use the cached verdicts while they are
current and compute stale ones in memory without storing them. The cache is refreshed when
runs are written (`record_run`, `import_lines`, `merge`; the web app after each push), by
`refresh_verdicts`.

An experiment belongs to the atlas, not to whoever registers it again: registering (or
importing, or pushing) a spec the ledger holds changes neither its title, hypothesis, spec nor
tags; tags it brings are stored as that contributor's tags, beside the original ones.
"""
from __future__ import annotations

import getpass
import math
import os
import zlib
from datetime import datetime
from typing import Any, Iterable

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quantatlas.atlas import ids
from quantatlas.atlas.db import migrate, open_engines, resolve_url, write_transaction
from quantatlas.atlas.ids import environment_key
from quantatlas.atlas.models import (Arm, ContributedTag, Contributor, DuplicateFlag, Environment, Experiment, Metric,
                                     Reproduction, Run, RunSet, Tag, Verdict)
from quantatlas.atlas.records import PerTokenKLD, RecordError, decode_per_token, encode_per_token, plain
from quantatlas.atlas.similarity import DUPLICATE_THRESHOLD, dice, trigrams
from quantatlas.atlas.verdict import (RESULTS, Criterion, FinalVerdict, RunSetInfo, SeedRun, combine_run_sets,
                                      experiment_result, is_reference_arm, judge_run_set, seeded_arms)
from quantatlas.spec import stable_arm_config

__all__ = ["Ledger", "LedgerError", "environment_key"]

STATS_VERSION = "2"          # bump when verdict statistics change: cached verdicts are recomputed
KEY_METRICS = ("kld_mean", "kld_se", "kld_p99", "same_top", "ppl_ratio", "bits_per_weight", "bits_per_param",
               "bytes_zstd")


class LedgerError(ValueError):
    """A user mistake against the ledger (unknown id, unknown arm, ...): one line, names the value."""


def default_contributor() -> str:
    name = os.environ.get("QUANTATLAS_CONTRIBUTOR")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "anonymous"


# ---- per-token KLD storage ---------------------------------------------------------------

def encode_tokens(values: np.ndarray) -> tuple[bytes, str, int]:
    return encode_per_token(values)


def decode_tokens(blob: bytes, sha256: str | None = None, n: int | None = None) -> np.ndarray:
    """A stored array, through the bounded decoder of push and import (`records.decode_per_token`):
    never more than the run's n_tokens values are inflated."""
    if n is None:            # rows written before n_tokens was kept: bounded by the per-run limit
        from quantatlas.atlas.records import MAX_TOKENS

        d = zlib.decompressobj()
        try:
            raw = d.decompress(blob, 4 * MAX_TOKENS + 1)
        except zlib.error as e:
            raise LedgerError(f"stored per-token KLD is not zlib data ({e})") from None
        if not d.eof or len(raw) % 4:
            raise LedgerError("stored per-token KLD is over the per-run limit or truncated")
        n = len(raw) // 4
    try:
        return decode_per_token(blob, n, sha256, "stored per-token KLD", check_values=False)
    except RecordError as e:
        raise LedgerError(f"{e} (corrupted run)") from None


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


def _metric_value(m: Metric) -> float:
    if m.nonfinite is None:
        return m.value
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[m.nonfinite]


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


class Ledger:
    """One ledger database. `url`: a SQLAlchemy URL (None: $QUANTATLAS_DB, else
    sqlite:///runs/atlas.db); the schema is migrated on open. `contributor`: who records runs
    (default $QUANTATLAS_CONTRIBUTOR, else the login name)."""

    def __init__(self, url: str | None = None, contributor: str | None = None):
        self.url = resolve_url(url)
        self._write, self._read, self.dialect = open_engines(self.url)
        migrate(self._write, self._read)
        self.contributor = contributor or default_contributor()
        self._grams: dict[str, frozenset] = {}

    def close(self) -> None:
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- sessions ---------------------------------------------------------------------------

    def _reading(self) -> Session:
        return Session(self._read, expire_on_commit=False)

    def _writing(self, fn):
        return write_transaction(self._write, fn)

    # ---- experiments ------------------------------------------------------------------------

    def register_experiment(self, spec: dict, contributor: str | None = None) -> str:
        """The experiment's id (`cexp_` + hex of the normalised spec without free text). An
        identical spec registered before keeps its id and row (its tags are merged in).
        `contributor`, when given, also records this ledger's later runs."""
        if contributor:
            self.contributor = contributor
        full, identity = ids.normalise_spec(spec)
        return self._writing(lambda s: self._register(s, full, identity, self.contributor))

    def _register(self, s: Session, full: dict, identity: dict, contributor: str | None,
                  given_id: str | None = None, created_at: datetime | None = None) -> str:
        """The experiment of this spec: a new row, or the stored one left as it is (tags that
        `full` adds become `contributor`'s tags)."""
        h = ids.spec_hash(identity)
        old = s.scalars(select(Experiment).where(Experiment.spec_hash == h)).first()
        if old is not None:
            self._contribute_tags(s, old, contributor, full.get("tags") or [])
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
                         source="spec", contributor=self._contributor(s, contributor) if contributor else None)
        if created_at is not None:
            exp.created_at = created_at
        exp.tags = [Tag(name=t) for t in dict.fromkeys(full.get("tags") or [])]
        exp.arms = [Arm(name=name, position=i, config=cfg, is_control=(name == control))
                    for i, (name, cfg) in enumerate((full.get("arms") or {}).items())]
        s.add(exp)
        s.flush()
        self._flag_duplicates(s, exp)
        return exp_id

    def add_hypothesis(self, exp_id: str, hypothesis: str, result: str | None = None, title: str = "",
                       tags: list[str] | None = None, imported: dict | None = None) -> bool:
        """A hypothesis-only row (e.g. from another platform's listing), keeping its id.
        False when the id is already in the ledger."""
        return self._writing(lambda s: self._add_hypothesis(s, exp_id, hypothesis, result, title, tags, imported))

    def _add_hypothesis(self, s: Session, exp_id: str, hypothesis: str, result: str | None, title: str = "",
                        tags: list[str] | None = None, imported: dict | None = None,
                        created_at: datetime | None = None, contributor: str | None = None) -> bool:
        if s.get(Experiment, exp_id) is not None:
            return False
        if result is not None and result not in RESULTS:
            raise LedgerError(f"result {result!r} is not one of {', '.join(RESULTS)}")
        # a result the row states is an imported claim: kept in `imported`, never the verdict
        exp = Experiment(id=exp_id, title=(title or "").strip(), hypothesis=(hypothesis or "").strip(), source="import",
                         imported=dict(imported or {}, result=result), result=None,
                         contributor=self._contributor(s, contributor) if contributor else None)
        if created_at is not None:
            exp.created_at = created_at
        exp.tags = [Tag(name=t) for t in dict.fromkeys(tags or [])]
        s.add(exp)
        s.flush()
        self._flag_duplicates(s, exp)
        return True

    def _contribute_tags(self, s: Session, exp: Experiment, contributor: str | None, tags: Iterable[str]) -> list[str]:
        """Store `tags` that `exp` lacks as `contributor`'s tags (never its original tags). The
        tags added."""
        if not contributor:
            return []
        have = {t.name for t in exp.tags}
        new = [t for t in dict.fromkeys(tags) if t not in have]
        if not new:
            return []
        who = self._contributor(s, contributor)
        mine = set(s.scalars(select(ContributedTag.name).where(ContributedTag.experiment_id == exp.id,
                                                               ContributedTag.contributor_id == who.id)))
        added = [t for t in new if t not in mine]
        for t in added:
            s.add(ContributedTag(experiment_id=exp.id, contributor_id=who.id, name=t))
        s.flush()
        return added

    def _contributed_tags(self, s: Session, exp_id: str) -> dict[str, list[str]]:
        return contributed_tags(s, exp_id)

    def _trigrams(self, exp_id: str, text: str) -> frozenset:
        key = f"{exp_id}\0{text}"
        if key not in self._grams:
            self._grams[key] = trigrams(text)
        return self._grams[key]

    def _flag_duplicates(self, s: Session, exp: Experiment) -> None:
        """Flag `exp` as a possible duplicate of every earlier experiment whose hypothesis is
        near-identical (similarity >= DUPLICATE_THRESHOLD), except the same spec on another
        model (same family), which is a sibling, not a duplicate."""
        if not (exp.hypothesis or "").strip():
            return
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

    def _contributor(self, s: Session, name: str) -> Contributor:
        c = s.scalars(select(Contributor).where(Contributor.name == name)).first()
        if c is None:
            c = Contributor(name=name)
            s.add(c)
            s.flush()
        return c

    def _experiment(self, s: Session, exp_id: str) -> Experiment:
        """An experiment by id or unique id prefix."""
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

    def resolve(self, exp_id: str) -> str:
        with self._reading() as s:
            return self._experiment(s, exp_id).id

    def spec(self, exp_id: str) -> dict:
        with self._reading() as s:
            exp = self._experiment(s, exp_id)
            if exp.spec is None:
                raise LedgerError(f"experiment {exp.id} is a hypothesis-only row: it has no spec to run")
            return dict(exp.spec)

    # ---- runs -------------------------------------------------------------------------------

    def has_run(self, exp_id: str, arm: str, seed: int, environment_key: str, contributor: str | None = None) -> bool:
        """Whether arm × seed of the experiment is recorded from this environment by this contributor."""
        who = contributor or self.contributor
        with self._reading() as s:
            q = (select(Run.id).join(Arm, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
                 .join(Contributor, RunSet.contributor_id == Contributor.id)
                 .where(Arm.experiment_id == exp_id, Arm.name == arm, Run.seed == int(seed),
                        RunSet.environment_key == environment_key, Contributor.name == who).limit(1))
            return s.execute(q).first() is not None

    def record_run(self, exp_id: str, arm: str, seed: int, metrics: dict[str, float],
                   per_token_kld: np.ndarray | None, environment: dict, model_hash: str, eval_fingerprint: str,
                   contributor: str | None = None) -> str:
        """Store one finished arm × seed in one transaction; returns the run id. Idempotent.
        The experiment's (and its family's) cached verdicts are refreshed after the write."""
        who = contributor or self.contributor
        rid, new = self._writing(lambda s: self._record(s, exp_id, arm, seed, metrics, per_token_kld, environment,
                                                        model_hash, eval_fingerprint, who))
        if new:
            self.refresh_verdicts([exp_id])
        return rid

    def _record(self, s: Session, exp_id: str, arm: str, seed: int, metrics: dict, per_token_kld,
                environment: dict, model_hash: str, eval_fingerprint: str, contributor: str,
                created_at: datetime | None = None, extra: dict | None = None) -> tuple[str, bool]:
        """(run id, whether it is new)."""
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
        env_key = environment_key(environment)
        rid = ids.run_id(exp_id, arm, int(seed), env_key, contributor, model_hash, eval_fingerprint)
        if s.get(Run, rid) is not None:
            return rid, False
        rows, loose = _metric_rows(metrics)
        extra = {**loose, **(extra or {})}
        blob = digest = n_tokens = None
        if per_token_kld is not None:
            values = np.asarray(per_token_kld)
            if values.ndim != 1:
                raise LedgerError(f"per_token_kld must be 1-D (one value per scored token), got shape {values.shape}")
            blob, digest, n_tokens = encode_tokens(values)
            known = s.execute(select(Run.n_tokens).join(Arm, Run.arm_id == Arm.id)
                              .join(RunSet, Run.run_set_id == RunSet.id)
                              .where(Arm.experiment_id == exp_id, RunSet.model_hash == model_hash,
                                     RunSet.eval_fingerprint == eval_fingerprint, Run.n_tokens.is_not(None))
                              .limit(1)).scalar()
            if known is not None and known != n_tokens:
                raise LedgerError(f"per_token_kld has {n_tokens} tokens but runs of {exp_id} on the same model "
                                  f"and eval fingerprint have {known}")
        if s.get(Environment, env_key) is None:
            s.add(Environment(key=env_key, device=_s(environment.get("device")),
                              hostname=_s(environment.get("hostname")), git_commit=_s(environment.get("git_commit")),
                              python=_s(environment.get("python")), platform=_s(environment.get("platform")),
                              packages=environment.get("packages"), full=_jsonable(environment)))
            s.flush()
        who = self._contributor(s, contributor)
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
        run = Run(id=rid, arm_id=arm_row.id, run_set_id=rs.id, seed=int(seed), n_tokens=n_tokens,
                  per_token_kld=blob, per_token_sha256=digest, extra=extra or None)
        if created_at is not None:
            run.created_at = created_at
        run.metrics = [Metric(name=n, value=v, nonfinite=nf) for n, v, nf in rows]
        s.add(run)
        s.flush()
        return rid, True

    # ---- sensitivity (issue 17) ------------------------------------------------------------

    def record_sensitivity(self, exp_id: str, arm: str, seed: int, sens: dict, rows: list[dict],
                           model_hash: str) -> int:
        """Store one sensitivity measurement (quant/sensitivity.py: `Sensitivity.to_dict()` and its
        ROI `rows`) of an arm x calibration seed; a repeat by the same contributor replaces it."""
        from quantatlas.atlas.models import SensitivityResult

        def finite(x):  # JSON columns hold no inf/nan (PostgreSQL refuses them): null instead
            if isinstance(x, float):
                return x if math.isfinite(x) else None
            if isinstance(x, dict):
                return {k: finite(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [finite(v) for v in x]
            return x

        def write(s: Session) -> int:
            exp = self._experiment(s, exp_id)
            who = self._contributor(s, self.contributor)
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
                                    forward_passes=int(sens["forward_passes"]), rows=finite(rows), data=finite(sens))
            s.add(row)
            s.flush()
            return row.id

        return self._writing(write)

    def sensitivities(self, exp_id: str | None = None) -> list[dict]:
        """Stored sensitivity measurements (of one experiment, or all), newest first."""
        from quantatlas.atlas.models import SensitivityResult

        with self._reading() as s:
            q = select(SensitivityResult, Contributor.name).join(
                Contributor, Contributor.id == SensitivityResult.contributor_id)
            if exp_id is not None:
                q = q.where(SensitivityResult.experiment_id == self._experiment(s, exp_id).id)
            out = []
            for r, who in s.execute(q.order_by(SensitivityResult.id.desc())).all():
                out.append({"id": r.id, "experiment_id": r.experiment_id, "arm": r.arm, "seed": r.seed,
                            "contributor": who, "model_hash": r.model_hash, "base": r.base, "grouping": r.grouping,
                            "kld_base": r.kld_base, "calib_tokens": r.calib_tokens,
                            "forward_passes": r.forward_passes, "rows": r.rows, "data": r.data,
                            "created_at": r.created_at.isoformat() if r.created_at else None})
            return out

    def runs(self, exp_id: str) -> list[dict]:
        """Every run of an experiment, oldest first, with metrics (and per-token KLD arrays)."""
        with self._reading() as s:
            exp = self._experiment(s, exp_id)
            return [self._run_dict(r, tokens=True) for r in self._runs(s, exp.id)]

    def find_run(self, arm_config: dict, seed: int, environment_key: str | None, model_hash: str,
                 eval_fingerprint: str, calib: dict | None) -> dict | None:
        """This contributor's run of the same arm config and seed in any experiment, made in the same
        environment (None: any) on the same model, eval tokens and calibration data (the spec's
        `data.calib`; None: any, for an arm that reads none): what a changed spec (an arm added, a
        hypothesis reworded) reuses instead of running again."""
        with self._reading() as s:
            q = (select(Run).join(Arm, Run.arm_id == Arm.id).join(RunSet, Run.run_set_id == RunSet.id)
                 .join(Contributor, RunSet.contributor_id == Contributor.id)
                 .where(Run.seed == seed, RunSet.model_hash == model_hash,
                        RunSet.eval_fingerprint == eval_fingerprint, Contributor.name == self.contributor)
                 .order_by(Run.created_at))
            if environment_key is not None:
                q = q.where(RunSet.environment_key == environment_key)
            for r in s.scalars(q):
                spec = r.arm.experiment.spec or {}
                if (stable_arm_config(r.arm.config or {}) == stable_arm_config(arm_config)
                        and (calib is None or (spec.get("data") or {}).get("calib") == calib)):
                    return self._run_dict(r, tokens=True)
        return None

    def _runs(self, s: Session, exp_id: str) -> list[Run]:
        return list(s.scalars(select(Run).join(Arm, Run.arm_id == Arm.id).where(Arm.experiment_id == exp_id)
                              .order_by(Run.run_set_id, Arm.position, Run.seed)))

    def _run_dict(self, r: Run, tokens: bool = False) -> dict:
        d = {"id": r.id, "arm": r.arm.name, "seed": r.seed, "run_set": r.run_set_id,
             "contributor": r.run_set.contributor.name, "environment_key": r.run_set.environment_key,
             "model_hash": r.run_set.model_hash, "eval_fingerprint": r.run_set.eval_fingerprint,
             "created_at": _iso(r.created_at), "metrics": {m.name: _metric_value(m) for m in r.metrics},
             "extra": r.extra, "n_tokens": r.n_tokens}
        if tokens:
            d["per_token_kld"] = _stored_tokens(r)
        return d

    # ---- verdicts ---------------------------------------------------------------------------

    def _stamp(self, s: Session, exp: Experiment) -> str:
        n_runs = s.execute(select(func.count(Run.id)).join(Arm, Run.arm_id == Arm.id)
                           .where(Arm.experiment_id == exp.id)).scalar()
        fam_runs = fam_exps = 0
        if exp.family_hash is not None:
            fam_exps = s.execute(select(func.count(Experiment.id)).where(
                Experiment.family_hash == exp.family_hash, Experiment.merged_into.is_(None))).scalar()
            fam_runs = s.execute(select(func.count(Run.id)).join(Arm, Run.arm_id == Arm.id)
                                 .join(Experiment, Arm.experiment_id == Experiment.id)
                                 .where(Experiment.family_hash == exp.family_hash,
                                        Experiment.merged_into.is_(None))).scalar()
        return f"{STATS_VERSION}:{n_runs}:{fam_runs}:{fam_exps}"

    def _judge(self, s: Session, exp: Experiment) -> tuple[Criterion, list[str], list]:
        """Per run set (oldest first): (RunSetInfo, {arm: ArmJudgement})."""
        crit = Criterion.from_spec(exp.spec)
        order = [a.name for a in exp.arms]
        sets: dict[int, dict[str, dict[int, SeedRun]]] = {}
        infos: dict[int, RunSetInfo] = {}
        for r in self._runs(s, exp.id):
            rs = r.run_set
            if rs.id not in infos:
                env = rs.environment
                host = env.hostname or "?"
                infos[rs.id] = RunSetInfo(rs.id, ((host, env.device or "?"), rs.contributor.name),
                                          f"{rs.contributor.name}@{host}")
            per_token = _stored_tokens(r)
            metrics = {m.name: _metric_value(m) for m in r.metrics}
            sets.setdefault(rs.id, {}).setdefault(r.arm.name, {})[r.seed] = SeedRun(r.seed, metrics, per_token)
        ordered = sorted(infos.values(), key=lambda i: (s.get(RunSet, i.id).created_at, i.id))
        seeded = seeded_arms(exp.spec)
        judged = [(info, judge_run_set(sets[info.id], order, exp.control, crit, exp.spec, seeded))
                  for info in ordered]
        return crit, order, judged

    def _compute(self, s: Session, exp: Experiment) -> tuple[list[FinalVerdict], Criterion]:
        crit, order, judged = self._judge(s, exp)
        siblings: dict[str, list[str]] = {a: [] for a in order}
        if exp.family_hash is not None:
            sibs = s.scalars(select(Experiment).where(Experiment.family_hash == exp.family_hash,
                                                      Experiment.id != exp.id,
                                                      Experiment.merged_into.is_(None))).all()
            for sib in sibs:
                scrit, sorder, sjudged = self._judge(s, sib)
                for a in sorder:
                    fv = combine_run_sets(sjudged, a, scrit, [])
                    if fv is not None and a in siblings:
                        siblings[a].append(fv.result)
        finals = [fv for a in order if (fv := combine_run_sets(judged, a, crit, siblings[a])) is not None]
        return finals, crit

    def verdicts(self, exp_id: str) -> list[dict]:
        """One dict per arm with runs (treatments, and the control as 'baseline'): result, p_value,
        p_adjusted, effect, ci, confidence, text, bits_delta, reproductions, ... Cached in the
        ledger and recomputed when the experiment's (or its family's) runs change."""
        with self._reading() as s:
            exp = self._experiment(s, exp_id)
            if exp.spec is None:
                return []
            return [dict(v) for v in self._state(s, exp)["summaries"]]

    def _state(self, s: Session, exp: Experiment) -> dict:
        """The experiment's verdicts (summaries, details per arm, result, confidence): from the
        cache while it is current, else computed in memory and not stored (reads never write)."""
        if exp.spec is None:
            return {"summaries": [], "details": {}, "result": exp.result, "confidence": exp.confidence,
                    "stale": False}
        if exp.verdict_stamp == self._stamp(s, exp):
            rows = s.scalars(select(Verdict).where(Verdict.experiment_id == exp.id).order_by(Verdict.id)).all()
            return {"summaries": [plain(v.details["summary"]) for v in rows],
                    "details": {v.arm: plain(v.details) for v in rows},
                    "result": exp.result, "confidence": exp.confidence, "stale": False}
        finals, crit = self._compute(s, exp)
        has_treatments = exp.control is not None and len(exp.arms) > 1
        result, confidence, _ = experiment_result(finals, has_treatments)
        summaries = [_jsonable(fv.as_dict(crit)) for fv in finals]
        details = {fv.arm: _jsonable({"summary": fv.as_dict(crit), **fv.details()}) for fv in finals}
        return {"summaries": summaries, "details": details, "result": result, "confidence": confidence,
                "stale": True}

    def refresh_verdicts(self, exp_ids: Iterable[str] | None = None) -> list[str]:
        """Recompute and store the cached verdicts of these experiments and of their families'
        (all experiments when None) where they are stale; one write transaction each. Called
        when runs are written; the ids refreshed."""
        with self._reading() as s:
            q = select(Experiment).where(Experiment.spec.is_not(None))
            if exp_ids is not None:
                wanted = set(exp_ids)
                fams = set(s.scalars(select(Experiment.family_hash).where(Experiment.id.in_(wanted),
                                                                           Experiment.family_hash.is_not(None))))
                q = q.where(Experiment.id.in_(wanted) | Experiment.family_hash.in_(fams))
            stale = [e.id for e in s.scalars(q).all() if e.verdict_stamp != self._stamp(s, e)]
        done = []
        for exp_id in stale:
            # the statistics are computed in a read session: the write lock is held only to store them
            with self._reading() as s:
                exp = s.get(Experiment, exp_id)
                stamp = self._stamp(s, exp)
                finals, crit = self._compute(s, exp)
                has_treatments = exp.control is not None and len(exp.arms) > 1
            if self._writing(lambda s, i=exp_id: self._store(s, s.get(Experiment, i), finals, crit, has_treatments,
                                                             stamp)):
                done.append(exp_id)
        return done

    def _store(self, s: Session, exp: Experiment, finals: list[FinalVerdict], crit: Criterion, has_treatments: bool,
               stamp: str) -> bool:
        """Store computed verdicts as the cache, unless runs arrived since they were computed
        (then the refresh those runs start stores theirs)."""
        if self._stamp(s, exp) != stamp:
            return False
        for old in s.scalars(select(Verdict).where(Verdict.experiment_id == exp.id)).all():
            s.delete(old)
        for old in s.scalars(select(Reproduction).where(Reproduction.experiment_id == exp.id)).all():
            s.delete(old)
        s.flush()
        for fv in finals:
            summary = fv.as_dict(crit)
            j = fv.primary
            s.add(Verdict(experiment_id=exp.id, arm=fv.arm, control=fv.control, result=fv.result,
                          p_value=j.p_value, p_adjusted=j.p_adjusted, effect=j.effect,
                          ci_low=j.ci[0] if j.ci else None, ci_high=j.ci[1] if j.ci else None,
                          confidence=fv.confidence, bits_delta=j.bits_delta, text=fv.text,
                          details=_jsonable({"summary": summary, **fv.details()})))
            for rs, rj, agree, independent in fv.reproductions:
                s.add(Reproduction(experiment_id=exp.id, run_set_id=rs.id, arm=fv.arm, result=rj.result,
                                   agrees=agree, independent=independent))
        result, confidence, _ = experiment_result(finals, has_treatments)
        exp.result, exp.confidence = result, confidence
        exp.verdict_stamp = stamp
        return True

    # ---- merge ------------------------------------------------------------------------------

    def merge(self, keep: str, other: str) -> dict:
        """Merge experiment `other` into `keep` after a look: `other` becomes an alias that the
        list hides; its tags join `keep`'s; its runs stay with its own spec. A hypothesis-only
        `keep` shows the verdict of its merged experiments."""
        out = self._writing(lambda s: self._merge(s, self._experiment(s, keep), self._experiment(s, other)))
        self.refresh_verdicts([out["kept"], out["merged"]])
        return out

    def _merge(self, s: Session, a: Experiment, b: Experiment) -> dict:
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

    # ---- rows for the list and the page ---------------------------------------------------

    def rows(self, tag: str | None = None, model: str | None = None, result: str | None = None,
             include_merged: bool = False) -> list[dict]:
        """The list: one row per experiment (id, hypothesis, result, confidence, reproductions,
        duplicate_of, key metrics), oldest first. Merged experiments are hidden unless asked.
        Writes nothing (stale verdicts are computed in memory)."""
        if result is not None and result not in RESULTS:
            raise LedgerError(f"--result {result!r} is not one of {', '.join(RESULTS)}")
        with self._reading() as s:
            q = select(Experiment).order_by(Experiment.created_at, Experiment.id)
            if not include_merged:
                q = q.where(Experiment.merged_into.is_(None))
            if tag is not None:
                q = q.where(Experiment.id.in_(select(Tag.experiment_id).where(Tag.name == tag)))
            if model is not None:
                q = q.where(Experiment.model == model)
            out = [self._row(s, e) for e in s.scalars(q).all()]
        if result is not None:
            out = [r for r in out if r["result"] == result]
        return out

    def _row(self, s: Session, e: Experiment) -> dict:
        # the best match; among equal scores the oldest experiment (the original, not a repeat)
        flags = s.scalars(select(DuplicateFlag).join(Experiment, DuplicateFlag.other_id == Experiment.id)
                          .where(DuplicateFlag.experiment_id == e.id)
                          .order_by(DuplicateFlag.score.desc(), Experiment.created_at, Experiment.id)).all()
        aliases = s.scalars(select(Experiment.id).where(Experiment.merged_into == e.id)
                            .order_by(Experiment.created_at)).all()
        state = self._state(s, e)
        result, confidence, via, summaries = state["result"], state["confidence"], None, state["summaries"]
        spec = e.spec
        if not summaries:
            for alias in aliases:
                a = s.get(Experiment, alias)
                if a.spec is None:
                    continue
                st = self._state(s, a)
                if st["result"] is not None:
                    result, confidence, via, summaries, spec = st["result"], st["confidence"], a.id, \
                        st["summaries"], a.spec
                    break
        deciding = _deciding(summaries, result)
        metrics = self._arm_means(s, via or e.id)
        primary = _primary(spec, summaries, deciding, metrics)
        claim = (e.imported or {}).get("result") if e.spec is None else None
        row = {
            "id": e.id, "title": e.title, "hypothesis": e.hypothesis, "result": result,
            "confidence": confidence, "result_via": via, "verdict_stale": state["stale"],
            "claim": claim, "claim_status": "imported claim, unverified" if claim else None,
            "primary": primary.get("arm"),
            "reproductions": deciding.get("reproductions") if summaries else None,
            "reproductions_agree": deciding.get("reproductions_agree") if summaries else None,
            "duplicate_of": flags[0].other_id if flags else None,
            "duplicate_score": flags[0].score if flags else None,
            "merged_into": e.merged_into, "aliases": list(aliases),
            "model": e.model, "tags": sorted(t.name for t in e.tags), "source": e.source,
            "contributed_tags": self._contributed_tags(s, e.id),
            "control": e.control, "criterion": (e.spec or {}).get("criterion", {}).get("metric") if e.spec else None,
            "arms": [{k: v.get(k) for k in ("arm", "result", "effect", "p_adjusted", "confidence", "bits_delta",
                                            "treatment_mean", "control_mean")} for v in summaries],
            "metrics": metrics,
        }
        if e.imported:
            row["imported"] = e.imported
            if row["reproductions"] is None:
                row["reproductions_column"] = e.imported.get("reproductions_column")
        row["key_metrics"] = _key_metrics(row, primary)
        return row

    def _arm_means(self, s: Session, exp_id: str) -> dict[str, dict]:
        """Key metrics per arm, averaged over the seeds of the first run set."""
        first = s.scalars(select(RunSet).where(RunSet.experiment_id == exp_id)
                          .order_by(RunSet.created_at, RunSet.id)).first()
        if first is None:
            return {}
        q = (select(Arm.name, Arm.position, Metric.name, func.avg(Metric.value), func.count(Metric.value))
             .join(Run, Run.arm_id == Arm.id).join(Metric, Metric.run_id == Run.id)
             .where(Run.run_set_id == first.id, Metric.name.in_(KEY_METRICS))
             .group_by(Arm.name, Arm.position, Metric.name).order_by(Arm.position))
        out: dict[str, dict] = {}
        for arm, _pos, name, mean, n in s.execute(q).all():
            d = out.setdefault(arm, {})
            d[name] = None if mean is None else float(mean)
            d["n_seeds"] = max(d.get("n_seeds", 0), int(n))
        return out

    def describe(self, exp_id: str) -> dict:
        """Everything `atlas show` prints: the experiment, its arms, run sets with per-seed
        figures, verdicts with their reasoning, duplicate flags and aliases."""
        exp_id = self.resolve(exp_id)
        with self._reading() as s:
            e = s.get(Experiment, exp_id)
            state = self._state(s, e)
            verdicts = [dict(v) for v in state["summaries"]]
            row = self._row(s, e)
            run_sets = []
            for rs in s.scalars(select(RunSet).where(RunSet.experiment_id == e.id)
                                .order_by(RunSet.created_at, RunSet.id)).all():
                env = rs.environment
                runs = [self._run_dict(r) for r in s.scalars(
                    select(Run).join(Arm, Run.arm_id == Arm.id).where(Run.run_set_id == rs.id)
                    .order_by(Arm.position, Run.seed)).all()]
                run_sets.append({"id": rs.id, "contributor": rs.contributor.name, "hostname": env.hostname,
                                 "device": env.device, "git_commit": env.git_commit,
                                 "environment_key": rs.environment_key, "model_hash": rs.model_hash,
                                 "eval_fingerprint": rs.eval_fingerprint, "created_at": _iso(rs.created_at),
                                 "runs": runs})
            details = state["details"]
            flags_out = [{"other": f.other_id, "score": f.score, "status": f.status} for f in s.scalars(
                select(DuplicateFlag).where(DuplicateFlag.experiment_id == e.id))]
            flags_in = [{"other": f.experiment_id, "score": f.score, "status": f.status} for f in s.scalars(
                select(DuplicateFlag).where(DuplicateFlag.other_id == e.id))]
            return _jsonable({
                **row, "notes": e.notes, "spec": e.spec, "created_at": _iso(e.created_at),
                "contributor": e.contributor.name if e.contributor else None,
                "arms_config": [{"arm": a.name, "config": a.config, "control": a.is_control} for a in e.arms],
                "run_sets": run_sets,
                "verdicts": [dict(v, details={k: x for k, x in (details.get(v["arm"]) or {}).items()
                                              if k != "summary"}) for v in verdicts],
                "duplicate_flags": flags_out, "duplicated_by": flags_in,
            })

    # ---- import / export (JSON lines) -----------------------------------------------------

    def export_records(self) -> Iterable[dict]:
        from quantatlas.atlas.io import export_records
        return export_records(self)

    def import_lines(self, lines: Iterable[str], source: str = "<input>") -> dict:
        from quantatlas.atlas.io import import_lines
        return import_lines(self, lines, source)


def _stored_tokens(r: Run) -> np.ndarray | None:
    """A run's per-token KLD, or None when it has none or the stored bytes are damaged (a page
    and a verdict still work without it; `atlas export` reports the damage)."""
    if r.per_token_kld is None:
        return None
    try:
        return decode_tokens(r.per_token_kld, r.per_token_sha256, r.n_tokens)
    except LedgerError:
        return None


def contributed_tags(s: Session, exp_id: str) -> dict[str, list[str]]:
    """Contributor -> the tags they added to the experiment (sorted)."""
    out: dict[str, list[str]] = {}
    for name, tag in s.execute(select(Contributor.name, ContributedTag.name)
                               .join(Contributor, ContributedTag.contributor_id == Contributor.id)
                               .where(ContributedTag.experiment_id == exp_id)
                               .order_by(Contributor.name, ContributedTag.name)):
        out.setdefault(name, []).append(tag)
    return out


def _deciding(summaries: list[dict], result: str | None) -> dict:
    treat = [v for v in summaries if v.get("result") != "baseline"] or summaries
    same = [v for v in treat if v.get("result") == result] or treat
    if not same:
        return {}
    return max(same, key=lambda v: v.get("confidence") or 0.0) if result != "failure" else \
        min(same, key=lambda v: v.get("confidence") or 0.0)


def _primary(spec: dict | None, summaries: list[dict], deciding: dict, metrics: dict) -> dict:
    """The arm that stands for the experiment in the list: the spec's `primary`, else the best
    treatment on the criterion among arms that quantize something (an fp16 reference arm never
    stands for an experiment), else the deciding verdict."""
    by_arm = {v.get("arm"): v for v in summaries}
    named = (spec or {}).get("primary")
    if named:
        return by_arm.get(named) or {"arm": named}
    arms_cfg = (spec or {}).get("arms") or {}
    crit = Criterion.from_spec(spec)
    treat = [v for v in summaries if v.get("result") != "baseline" and v.get("treatment_mean") is not None
             and not is_reference_arm(arms_cfg.get(v.get("arm")))]
    if treat:
        return (min if crit.lower_is_better else max)(treat, key=lambda v: v["treatment_mean"])
    if deciding and not is_reference_arm(arms_cfg.get(deciding.get("arm"))):
        return deciding
    quantized = [a for a in metrics if not is_reference_arm(arms_cfg.get(a))]
    if quantized and spec:
        return by_arm.get(quantized[0]) or {"arm": quantized[0]}
    return deciding


def _key_metrics(row: dict, deciding: dict) -> str:
    """A short metrics cell: the primary arm against the control, or the baseline's figures."""
    metrics = row["metrics"]
    if not metrics:
        return (row.get("imported") or {}).get("metrics_column") or ""
    arm = deciding.get("arm") or next(iter(metrics))
    m = metrics.get(arm, {})
    parts = []
    if m.get("kld_mean") is not None:
        s = f"KLD {m['kld_mean']:.4g}"
        c = metrics.get(row.get("control") or "", {}).get("kld_mean")
        if deciding.get("result") not in (None, "baseline") and c is not None and arm != row.get("control"):
            s += f" vs {c:.4g}"
        parts.append(s)
    if deciding.get("effect") is not None and deciding.get("result") != "baseline":
        parts.append(f"{100 * deciding['effect']:+.1f}%")
    if m.get("bits_per_param") is not None:
        bits = f"{m['bits_per_param']:.3f} bpp"
        d = deciding.get("bits_delta")
        if d is not None and abs(d) > 0.001 and deciding.get("result") != "baseline":
            bits += f" ({d:+.3f})"
        parts.append(bits)
    if m.get("ppl_ratio") is not None:
        parts.append(f"PPLr {m['ppl_ratio']:.4f}")
    return f"{arm}: " + ", ".join(parts)


def _s(v: Any) -> str | None:
    return None if v is None else str(v)


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    return plain(value)


def encode_tokens_b64(values: np.ndarray | None) -> dict | None:
    return PerTokenKLD.of(values)


def decode_tokens_b64(obj: dict | None) -> np.ndarray | None:
    """The wire form ({n, sha256, zlib_f32_base64}) through the one bounded decoder."""
    if obj is None:
        return None
    try:
        return PerTokenKLD.model_validate(obj).decode()
    except (RecordError, ValueError) as e:
        raise LedgerError(f"per_token_kld: {e}") from None
