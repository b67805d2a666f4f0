"""What the store hands out: snapshots of its rows with no database session attached (they stay
valid after the read that made them), and the stored spec, parsed once where it leaves the store.

A stored spec is the validated spec as it was registered (the full dump of `ids.normalise_spec`).
`StoredSpec` parses it on first use and keeps what it parsed:

    criterion   the spec's `criterion:` as `quantatlas.spec.Criterion`
    seeded      arm -> whether its results depend on the seed (`quantatlas.spec.Arm.seeded`)
    eval        the spec's `data.eval` as `quantatlas.spec.EvalData` (the verdict's eval windows)

Each section is parsed on its own, so a spec that no longer validates as a whole (a codec since
removed) keeps its criterion and eval windows; `seeded` is then empty and the verdict judges its
arms from their runs (see verdict.py, rule 5).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
from pydantic import ValidationError

from quantatlas.atlas.errors import LedgerError
from quantatlas.atlas.records import MAX_TOKENS, NONFINITE, RecordError, decode_per_token
from quantatlas.spec import Criterion, EvalData, Spec, parse_stored_spec


def isoformat(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


# ---- the stored spec ---------------------------------------------------------------------------

class StoredSpec:
    """An experiment's stored spec (`data`: the dict as stored, None for a hypothesis-only row)."""

    def __init__(self, data: dict | None):
        self.data = data

    @property
    def present(self) -> bool:
        return self.data is not None

    @cached_property
    def model(self) -> Spec | None:
        """The whole spec, typed; None when there is none or it no longer validates."""
        if not self.data or not isinstance(self.data.get("arms"), dict):
            return None
        try:
            return parse_stored_spec(self.data, "spec")
        except Exception:  # any failure of an old spec means "no typed spec", never a failed read
            return None

    @cached_property
    def criterion(self) -> Criterion:
        try:
            return Criterion.model_validate(self._section("criterion"))
        except ValidationError:
            return Criterion()

    @cached_property
    def eval(self) -> EvalData:
        try:
            return EvalData.model_validate(self._section("data", "eval"))
        except ValidationError:
            return EvalData()

    @cached_property
    def seeded(self) -> dict[str, bool]:
        """Arm -> whether its results depend on the experiment seed; empty without a typed spec."""
        model = self.model
        return {} if model is None else {name: bool(arm.seeded) for name, arm in model.arms.items()}

    @property
    def arms(self) -> dict[str, Any]:
        """Arm name -> its stored config (plain JSON)."""
        arms = (self.data or {}).get("arms")
        return arms if isinstance(arms, dict) else {}

    @property
    def primary(self) -> str | None:
        return (self.data or {}).get("primary")

    def _section(self, *path: str) -> dict:
        node: Any = self.data or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node or {}


def seeded_arms(spec: dict | None) -> dict[str, bool]:
    """Arm name -> whether its results depend on the experiment seed, from a spec dict."""
    return StoredSpec(spec).seeded


# ---- per-token KLD as stored -------------------------------------------------------------------

def decode_tokens(blob: bytes, sha256: str | None = None, n: int | None = None) -> np.ndarray:
    """A stored array, through the bounded decoder of push and import (`records.decode_per_token`):
    never more than the run's n_tokens values are inflated."""
    if n is None:            # rows written before n_tokens was kept: bounded by the per-run limit
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


# ---- rows --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredArm:
    experiment_id: str
    name: str
    position: int
    config: dict | None
    is_control: bool


@dataclass(frozen=True)
class StoredExperiment:
    id: str
    spec_hash: str | None          # None: a hypothesis-only row
    family_hash: str | None
    title: str
    hypothesis: str
    notes: str | None
    model: str | None
    control: str | None
    spec: StoredSpec
    source: str                    # spec | import
    imported: dict | None
    contributor: str | None
    created_at: datetime | None
    merged_into: str | None
    result: str | None             # the cached experiment verdict (verdict_cache.py)
    confidence: float | None
    verdict_stamp: str | None
    tags: tuple[str, ...] = ()        # its own tags (contributed ones: `Reader.contributed_tags`)


@dataclass(frozen=True)
class StoredRunSet:
    """The runs of one experiment from one environment, contributor, model hash and eval fingerprint."""
    id: int
    experiment_id: str
    contributor: str
    environment_key: str
    model_hash: str
    eval_fingerprint: str
    created_at: datetime | None
    hostname: str | None
    device: str | None
    git_commit: str | None
    python: str | None
    platform: str | None
    packages: dict | None
    environment: dict | None       # everything the runner reported
    model_arch: str | None = None  # the model's architecture (atlas/architecture.py); None: not recorded


class RunCounts(NamedTuple):
    runs: int                      # of the experiment
    family_runs: int               # of its family's unmerged experiments (0 without a family)
    family_experiments: int


@dataclass(frozen=True)
class StoredRun:
    id: str
    experiment_id: str
    arm: str
    seed: int
    run_set: StoredRunSet
    created_at: datetime | None
    stored_metrics: tuple[tuple[str, float | None, str | None], ...]   # (name, value, 'nan'|'inf'|'-inf')
    extra: dict | None
    n_tokens: int | None
    per_token_zlib: bytes | None = field(default=None, repr=False)
    per_token_sha256: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """Name -> value, non-finite ones as float nan / inf."""
        return {name: value if nonfinite is None else NONFINITE[nonfinite]
                for name, value, nonfinite in self.stored_metrics}

    @property
    def metrics_as_stored(self) -> dict[str, float | str]:
        """Name -> value, non-finite ones as the strings 'nan', 'inf', '-inf' (the export form)."""
        return {name: value if nonfinite is None else nonfinite for name, value, nonfinite in self.stored_metrics}

    def per_token(self) -> np.ndarray | None:
        """The per-token KLD, or None when the run has none or the stored bytes are damaged (a page
        and a verdict still work without it; `atlas export` reports the damage)."""
        if self.per_token_zlib is None:
            return None
        try:
            return decode_tokens(self.per_token_zlib, self.per_token_sha256, self.n_tokens)
        except LedgerError:
            return None

    def as_dict(self, tokens: bool = False) -> dict:
        """The run as `Ledger.runs` returns it (with the per-token array when `tokens`)."""
        rs = self.run_set
        d = {"id": self.id, "arm": self.arm, "seed": self.seed, "run_set": rs.id, "contributor": rs.contributor,
             "environment_key": rs.environment_key, "model_hash": rs.model_hash,
             "eval_fingerprint": rs.eval_fingerprint, "created_at": isoformat(self.created_at),
             "metrics": self.metrics, "extra": self.extra, "n_tokens": self.n_tokens}
        if tokens:
            d["per_token_kld"] = self.per_token()
        return d


@dataclass(frozen=True)
class StoredFlag:
    """`experiment_id` may duplicate `other_id` (hypothesis similarity `score`)."""
    experiment_id: str
    other_id: str
    score: float
    status: str                    # flagged | merged


@dataclass(frozen=True)
class StoredArmMeans:
    """One arm's metric means over its runs on one model hash and eval fingerprint."""
    experiment_id: str
    title: str
    model: str | None
    merged_into: str | None
    arm: str
    is_control: bool
    config: dict | None
    model_hash: str
    eval_fingerprint: str
    n_runs: int
    means: dict[str, float | None]  # None: no value, or a non-finite one among the runs


@dataclass(frozen=True)
class StoredToken:
    id: int
    prefix: str
    contributor: str
    token_sha256: str
    created_at: datetime | None
    revoked_at: datetime | None

