"""The ledger's schema (SQLAlchemy 2 ORM). Migrations in `migrations/versions` create it.

experiment ─┬─ tag
            ├─ arm ── run ── metric            (run = arm × seed × run set)
            ├─ run_set (environment × contributor × model hash × eval fingerprint)
            ├─ verdict (per arm, cached; recomputed when runs change)
            ├─ reproduction (per arm × run set after the first: its own verdict, agrees or not)
            └─ duplicate_flag (possible duplicate of an earlier experiment, with a similarity score)
environment, contributor: shared lookups.

Only portable column types: the same code runs on SQLite and PostgreSQL.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


# a Python None is stored as SQL NULL (not the JSON text 'null'), so IS NULL finds it
JSONValue = JSON(none_as_null=True)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Contributor(Base):
    __tablename__ = "contributor"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Environment(Base):
    __tablename__ = "environment"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    device: Mapped[str | None] = mapped_column(String(300))
    hostname: Mapped[str | None] = mapped_column(String(300))
    git_commit: Mapped[str | None] = mapped_column(String(100))
    python: Mapped[str | None] = mapped_column(String(50))
    platform: Mapped[str | None] = mapped_column(String(300))
    packages: Mapped[dict | None] = mapped_column(JSONValue)
    full: Mapped[dict | None] = mapped_column(JSONValue)          # everything the runner reported
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Experiment(Base):
    __tablename__ = "experiment"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec_hash: Mapped[str | None] = mapped_column(String(64), index=True)    # null: hypothesis-only row
    family_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(Text, default="")
    hypothesis: Mapped[str] = mapped_column(Text, default="")
    notes: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(300), index=True)
    control: Mapped[str | None] = mapped_column(String(200))
    spec: Mapped[dict | None] = mapped_column(JSONValue)
    source: Mapped[str] = mapped_column(String(20), default="spec")          # spec | import
    imported: Mapped[dict | None] = mapped_column(JSONValue)   # hypothesis-only rows: result, ...
    contributor_id: Mapped[int | None] = mapped_column(ForeignKey("contributor.id"))
    merged_into: Mapped[str | None] = mapped_column(ForeignKey("experiment.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # cached experiment-level verdict, valid while verdict_stamp matches the runs it saw
    result: Mapped[str | None] = mapped_column(String(20))
    confidence: Mapped[float | None] = mapped_column(Float)
    verdict_stamp: Mapped[str | None] = mapped_column(String(100))

    tags: Mapped[list[Tag]] = relationship(back_populates="experiment", cascade="all, delete-orphan")
    arms: Mapped[list[Arm]] = relationship(back_populates="experiment", cascade="all, delete-orphan",
                                           order_by="Arm.position")
    contributor: Mapped[Contributor | None] = relationship()


class Tag(Base):
    __tablename__ = "tag"
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)
    experiment: Mapped[Experiment] = relationship(back_populates="tags")


class Arm(Base):
    __tablename__ = "arm"
    __table_args__ = (UniqueConstraint("experiment_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict | None] = mapped_column(JSONValue)
    is_control: Mapped[bool] = mapped_column(Boolean, default=False)
    experiment: Mapped[Experiment] = relationship(back_populates="arms")


class RunSet(Base):
    """The runs of one experiment made in one environment by one contributor, on one model
    hash and one eval fingerprint (runs are comparable only within these)."""
    __tablename__ = "run_set"
    __table_args__ = (UniqueConstraint("experiment_id", "environment_key", "contributor_id", "model_hash",
                                       "eval_fingerprint"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), index=True)
    environment_key: Mapped[str] = mapped_column(ForeignKey("environment.key"))
    contributor_id: Mapped[int] = mapped_column(ForeignKey("contributor.id"))
    model_hash: Mapped[str] = mapped_column(String(128))
    eval_fingerprint: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: the model's architecture as its config names it (qwen3, llama, qwen3_moe): from the runs' `model_arch`;
    #: null for run sets stored before it was recorded (read as of unknown architecture)
    model_arch: Mapped[str | None] = mapped_column(String(64))
    environment: Mapped[Environment] = relationship()
    contributor: Mapped[Contributor] = relationship()


class Run(Base):
    __tablename__ = "run"
    __table_args__ = (UniqueConstraint("arm_id", "run_set_id", "seed"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    arm_id: Mapped[int] = mapped_column(ForeignKey("arm.id"), index=True)
    run_set_id: Mapped[int] = mapped_column(ForeignKey("run_set.id"), index=True)
    seed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    per_token_kld: Mapped[bytes | None] = mapped_column(LargeBinary)     # zlib(float32 little-endian)
    per_token_sha256: Mapped[str | None] = mapped_column(String(64))    # of the raw float32 bytes
    extra: Mapped[dict | None] = mapped_column(JSONValue)                   # non-numeric result fields
    arm: Mapped[Arm] = relationship()
    run_set: Mapped[RunSet] = relationship()
    metrics: Mapped[list[Metric]] = relationship(cascade="all, delete-orphan")


class Metric(Base):
    __tablename__ = "metric"
    run_id: Mapped[str] = mapped_column(ForeignKey("run.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float | None] = mapped_column(Float)
    nonfinite: Mapped[str | None] = mapped_column(String(8))     # 'nan' | 'inf' | '-inf' (value is null)


class Verdict(Base):
    __tablename__ = "verdict"
    __table_args__ = (UniqueConstraint("experiment_id", "arm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), index=True)
    arm: Mapped[str] = mapped_column(String(200))
    control: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[str] = mapped_column(String(20))
    p_value: Mapped[float | None] = mapped_column(Float)
    p_adjusted: Mapped[float | None] = mapped_column(Float)
    effect: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    bits_delta: Mapped[float | None] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict | None] = mapped_column(JSONValue)
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Reproduction(Base):
    __tablename__ = "reproduction"
    __table_args__ = (UniqueConstraint("experiment_id", "run_set_id", "arm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), index=True)
    run_set_id: Mapped[int] = mapped_column(ForeignKey("run_set.id"))
    arm: Mapped[str] = mapped_column(String(200))
    result: Mapped[str] = mapped_column(String(20))
    agrees: Mapped[bool] = mapped_column(Boolean)
    independent: Mapped[bool] = mapped_column(Boolean)     # another machine or contributor than those before
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DuplicateFlag(Base):
    __tablename__ = "duplicate_flag"
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), primary_key=True)
    other_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), primary_key=True)
    score: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20), default="flagged")     # flagged | merged
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiToken(Base):
    """A contributor's bearer token for pushing runs to a shared server. Only the sha256 of the
    token is stored: the token is 256 random bits, so a plain hash cannot be inverted by search."""
    __tablename__ = "api_token"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    contributor_id: Mapped[int] = mapped_column(ForeignKey("contributor.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))          # the token's first characters, to name it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    contributor: Mapped[Contributor] = relationship()


class ContributedTag(Base):
    """A tag a contributor added to an experiment that someone else registered first: shown as
    theirs, beside (never instead of) the experiment's own tags."""
    __tablename__ = "contributed_tag"
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), primary_key=True)
    contributor_id: Mapped[int] = mapped_column(ForeignKey("contributor.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)


class SensitivityResult(Base):
    """One sensitivity measurement (quant/sensitivity.py) of an arm x calibration seed: ΔKLD and
    Δbits of moving each tensor group from the arm's codec to each candidate, on calibration tokens.
    `rows` is the ROI table (best buy first); `data` the whole measurement, enough to re-allocate."""
    __tablename__ = "sensitivity"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiment.id"), index=True)
    arm: Mapped[str] = mapped_column(String(200))
    seed: Mapped[int] = mapped_column(Integer)
    contributor_id: Mapped[int] = mapped_column(ForeignKey("contributor.id"))
    model_hash: Mapped[str] = mapped_column(String(64))
    base: Mapped[str] = mapped_column(String(300))
    grouping: Mapped[str] = mapped_column(String(20))
    kld_base: Mapped[float] = mapped_column(Float)
    calib_tokens: Mapped[int] = mapped_column(Integer)
    forward_passes: Mapped[int] = mapped_column(Integer)
    rows: Mapped[list] = mapped_column(JSONValue)
    data: Mapped[dict] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("experiment_id", "arm", "seed", "contributor_id", "model_hash", "grouping",
                                       name="uq_sensitivity_run"),)
