"""The one record model of the atlas: what `atlas export` writes, `atlas import` reads, a push
sends and a pull fetches (pydantic, no torch), with the checks every way in shares.

    {"type": "experiment", "id", "title", "hypothesis", "notes", "tags", "contributed_tags",
     "spec", "source", "imported", "contributor", "created_at", "merged_into"}
    {"type": "run", "id", "experiment", "arm", "seed", "contributor", "environment", "model_hash",
     "eval_fingerprint", "created_at", "metrics", "extra", "per_token_kld": {n, sha256, zlib_f32_base64}}
    {"id", "hypothesis", "result", ...}       # a hypothesis-only row of another platform's listing

Rules (each enforced here, whichever way a record comes in):

- Numbers: every JSON number, in every field, is finite and within float64 range (an integer of
  400 digits is refused, not stored). A metric is a number, or one of the strings "nan", "inf",
  "-inf" for a measurement that really is non-finite; a metric with a range must lie in it
  (`METRIC_RANGES`: KLD statistics >= 0 and finite, same_top in [0, 1], bits > 0 and finite,
  perplexities > 0). `extra` holds what is not a metric: its keys are at most 200 characters and
  never a metric's name (neither one of this run's metrics nor a ranged one).
- Shape: JSON nested deeper than `MAX_DEPTH` is refused before it is parsed (`json_depth` on the
  raw text) and again on every free-form field, so nothing stored can later fail to serialise.
- Size: per-token KLD decompresses to exactly `n` <= `MAX_TOKENS` finite float32 values >= 0
  (up to float rounding), checked against its sha256; `decode_per_token` never inflates more
  than 4 n + 1 bytes, so a small payload cannot become gigabytes. The ledger reads its stored
  arrays with the same decoder.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import zlib
from datetime import datetime
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, field_validator, \
    model_validator

from quantatlas.atlas.architecture import check_model_arch
from quantatlas.errors import UserError
from quantatlas.runtimes import check_runs_on

SCHEMA_VERSION = 1
MAX_DEPTH = 32                  # JSON nesting (objects and arrays) anywhere in a record or request
MAX_TOKENS = 1 << 24            # per-token KLD values in one run (16.7 M: 64 MiB of float32)
MAX_KEY = 200                   # metric, extra and tag names
KLD_ROUNDING = 1e-6             # a KLD summed in floating point may come out this far below 0
ID = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")]
Name = Annotated[str, Field(min_length=1, max_length=MAX_KEY)]
MetricValue = Union[StrictInt, StrictFloat, Literal["nan", "inf", "-inf"]]
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
RESULTS = ("success", "failure", "inconclusive", "baseline", "conflict")


class RecordError(UserError):
    """A record that breaks a rule: one line naming the field and the value."""


# ---- numbers -----------------------------------------------------------------------------------

#: (low, low inclusive, high, high inclusive, +inf allowed) by exact name; KLD statistics by prefix
_KLD = (-KLD_ROUNDING, True, math.inf, False, False)
METRIC_RANGES: dict[str, tuple] = {
    "same_top": (0.0, True, 1.0, True, False),
    "bits_per_weight": (0.0, False, math.inf, False, False),
    "bits_per_param": (0.0, False, math.inf, False, False),
    "ppl": (0.0, False, math.inf, False, True),
    "ppl_base": (0.0, False, math.inf, False, True),
    "ppl_ratio": (0.0, False, math.inf, False, True),
}


def metric_range(name: str) -> tuple | None:
    if name == "kld" or name.startswith("kld_"):
        return _KLD
    return METRIC_RANGES.get(name)


def _range_text(r: tuple) -> str:
    lo, lo_in, hi, hi_in, _ = r
    if r is _KLD:
        return ">= 0 and finite"
    if hi == math.inf:
        return f"{'>=' if lo_in else '>'} {lo:g}" + ("" if r[4] else " and finite")
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_metric(name: str, value: float) -> None:
    """Raise RecordError when `value` (a float, possibly non-finite) is outside `name`'s range."""
    r = metric_range(name)
    if r is None:
        return
    lo, lo_in, hi, hi_in, inf_ok = r
    ok = not math.isnan(value) and (value >= lo if lo_in else value > lo) and (
        (value == math.inf and inf_ok) or (value <= hi if hi_in else value < hi))
    if not ok:
        raise RecordError(f"metric {name!r}: {value!r} is out of its range (must be {_range_text(r)})")


def as_float(value: Any, where: str) -> float:
    """A JSON number as a finite float64, or RecordError (an integer too large for a float too)."""
    try:
        v = float(value)
    except OverflowError:
        raise RecordError(f"{where}: an integer of {len(str(abs(value)))} digits is beyond float64 range") from None
    if not math.isfinite(v):
        raise RecordError(f"{where}: non-finite number {value!r}")
    return v


def check_numbers(value: Any, where: str, depth: int = 0) -> None:
    """Every number in a free-form JSON value finite and within float64 range; nesting at most
    MAX_DEPTH; keys are strings."""
    if depth > MAX_DEPTH:
        raise RecordError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        as_float(value, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, f"{where}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_numbers(v, f"{where}[{i}]", depth + 1)
    else:
        raise RecordError(f"{where}: {type(value).__name__} is not a JSON value")


# ---- shape -------------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"]*"')
_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"')   # every byte but these is deleted


def json_depth(raw: bytes | str) -> int:
    """The deepest nesting of objects and arrays in JSON text, without parsing it (so a body
    nested 100 000 deep costs a scan, not a recursion error). Escapes are dropped first (an
    escaped backslash, then an escaped quote), then everything but brackets and quotes, then
    the strings; what is left is the structure."""
    if isinstance(raw, str):
        raw = raw.encode()
    if b"[" not in raw and b"{" not in raw:
        return 0
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _STRUCTURE)
    s = _STRING.sub(b"", s)
    if not s:
        return 0
    a = np.frombuffer(s, dtype=np.uint8)
    step = np.where((a == ord("[")) | (a == ord("{")), 1, np.where((a == ord("]")) | (a == ord("}")), -1, 0))
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def check_depth(raw: bytes | str, where: str = "JSON") -> None:
    d = json_depth(raw)
    if d > MAX_DEPTH:
        raise RecordError(f"{where} is nested {d} levels deep; the limit is {MAX_DEPTH}")


def plain(value: Any, depth: int = 0) -> Any:
    """A value any JSON encoder can write (strict JSON): non-finite floats and floats beyond range
    become None, numpy scalars Python ones, tuples lists, anything nested deeper than MAX_DEPTH
    the string '…'. For rendering what is stored, whatever it is."""
    if depth > MAX_DEPTH:
        return "…"
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return v if abs(v) <= 2 ** 63 else None
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), depth)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# ---- per-token KLD -----------------------------------------------------------------------------

def encode_per_token(values: np.ndarray) -> tuple[bytes, str, int]:
    """(zlib of the float32 little-endian bytes, sha256 of those bytes, n)."""
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return zlib.compress(raw, 6), hashlib.sha256(raw).hexdigest(), len(raw) // 4


def decode_per_token(blob: bytes, n: int, sha256: str | None, where: str = "per_token_kld",
                     check_values: bool = True) -> np.ndarray:
    """Exactly n float32 values from zlib `blob`, bounded: never more than 4 n + 1 bytes are
    inflated. With `check_values` they must be finite and >= 0 (up to rounding)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOKENS:
        raise RecordError(f"{where}: n must be an integer in [1, {MAX_TOKENS}], got {n!r}")
    expect = 4 * n
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob, expect + 1)
    except zlib.error as e:
        raise RecordError(f"{where}: not zlib data ({e})") from None
    if len(raw) != expect or d.unconsumed_tail or not d.eof:
        raise RecordError(f"{where}: does not decompress to n={n} float32 values")
    if sha256 is not None and hashlib.sha256(raw).hexdigest() != sha256:
        raise RecordError(f"{where}: sha256 does not match the values")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if check_values:
        bad = ~np.isfinite(values)
        if bad.any():
            raise RecordError(f"{where}: {int(bad.sum())} non-finite value(s)")
        neg = values < -KLD_ROUNDING
        if neg.any():
            raise RecordError(f"{where}: {int(neg.sum())} negative value(s) (KLD >= 0), e.g. {float(values[neg][0])!r}")
    return values


class PerTokenKLD(BaseModel):
    """Per-token KLD of a run: float32 little-endian, zlib-compressed, base64."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n: StrictInt = Field(ge=1, le=MAX_TOKENS, description="number of float32 values")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the raw float32 bytes")
    zlib_f32_base64: str = Field(max_length=4 * ((4 * MAX_TOKENS + 4 * MAX_TOKENS // 1000 + 64) // 3 + 1))

    def decode(self, where: str = "per_token_kld") -> np.ndarray:
        try:
            blob = base64.b64decode(self.zlib_f32_base64, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(f"{where}.zlib_f32_base64: not valid base64") from None
        return decode_per_token(blob, self.n, self.sha256, where)

    @classmethod
    def of(cls, values: np.ndarray | None) -> dict | None:
        if values is None:
            return None
        blob, digest, n = encode_per_token(values)
        return {"n": n, "sha256": digest, "zlib_f32_base64": base64.b64encode(blob).decode()}


# ---- records -----------------------------------------------------------------------------------

def _iso(value: str | None) -> str | None:
    if value is not None:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 date-time") from None
    return value


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ExperimentRecord(_Record):
    """An experiment. On a ledger that holds it already (same spec, or same id of a
    hypothesis-only row), nothing of it changes: tags the record adds are stored as the
    contributor's tags; its title, hypothesis and spec are kept as they were. `merged_into` is
    applied by `atlas import` only: merges are a ledger's own curation, never pushed."""
    type: Literal["experiment"] = "experiment"
    id: ID
    title: str | None = Field(None, max_length=2000)
    hypothesis: str | None = Field(None, max_length=20000)
    notes: str | None = Field(None, max_length=100000)
    tags: list[Name] = Field(default_factory=list, max_length=100)
    contributed_tags: dict[Name, list[Name]] = Field(default_factory=dict, max_length=1000,
                                                     description="tags added by contributors, by contributor")
    spec: dict[str, Any] | None = None
    source: str | None = Field(None, max_length=20)
    imported: dict[str, Any] | None = None
    contributor: str | None = Field(None, max_length=200)
    created_at: str | None = None
    merged_into: str | None = Field(None, max_length=64)

    @field_validator("spec", "imported")
    @classmethod
    def _numbers(cls, v, info):
        check_numbers(v, info.field_name)
        return v

    @field_validator("created_at")
    @classmethod
    def _time(cls, v):
        return _iso(v)

    @model_validator(mode="after")
    def _claim(self):
        result = (self.imported or {}).get("result")
        if result is not None and result not in RESULTS:
            raise ValueError(f"imported.result {result!r} is not one of {', '.join(RESULTS)}")
        if self.spec is None and not (self.hypothesis or "").strip():
            raise ValueError("an experiment needs a spec or a hypothesis")
        return self


class RunRecord(_Record):
    """One arm x seed. The receiving ledger recomputes its id."""
    type: Literal["run"] = "run"
    id: str | None = Field(None, max_length=64, description="the sender's run id (informative)")
    experiment: ID
    arm: Name
    seed: StrictInt = Field(ge=-(2 ** 31), le=2 ** 31 - 1)
    contributor: str | None = Field(None, max_length=200, description="on a push: the token's holder (or absent)")
    environment: dict[str, Any]
    model_hash: str = Field(min_length=1, max_length=128)
    eval_fingerprint: str = Field(min_length=1, max_length=128)
    created_at: str | None = None
    metrics: dict[Name, MetricValue] = Field(max_length=1000)
    extra: dict[Name, Any] | None = Field(None, max_length=1000)
    per_token_kld: PerTokenKLD | None = None

    @field_validator("environment", "extra")
    @classmethod
    def _numbers(cls, v, info):
        check_numbers(v, info.field_name)
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v):
        for k, x in v.items():
            value = NONFINITE[x] if isinstance(x, str) else as_float(x, f"metrics.{k}")
            check_metric(k, value)
        return v

    @field_validator("created_at")
    @classmethod
    def _time(cls, v):
        return _iso(v)

    @model_validator(mode="after")
    def _no_shadow(self):
        for k in self.extra or {}:
            if k in self.metrics or metric_range(k) is not None:
                raise ValueError(f"extra.{k} shadows the metric {k!r}: a metric goes in metrics")
        if "runs_on" in (self.extra or {}):   # which runtimes load the arm (quantatlas/runtimes.py)
            check_runs_on(self.extra["runs_on"], "extra.runs_on")
        if "model_arch" in (self.extra or {}):   # the model's architecture (atlas/architecture.py)
            check_model_arch(self.extra["model_arch"], "extra.model_arch")
        return self

    def metric_values(self) -> dict[str, float]:
        return {k: NONFINITE[v] if isinstance(v, str) else float(v) for k, v in self.metrics.items()}


class ListingRow(BaseModel):
    """A hypothesis-only row of another platform's listing (no "type"); its other columns are
    kept as `imported`. A result it states is an imported claim, never a verdict."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    id: ID
    hypothesis: str = Field(max_length=20000)
    result: str | None = None
    title: str | None = Field(None, max_length=2000)
    tags: list[Name] = Field(default_factory=list, max_length=100)

    @field_validator("result")
    @classmethod
    def _result(cls, v):
        if v is not None and v not in RESULTS:
            raise ValueError(f"result {v!r} is not one of {', '.join(RESULTS)}")
        return v

    @model_validator(mode="after")
    def _numbers(self):
        check_numbers(self.model_extra or {}, "row")
        return self

    def imported(self) -> dict:
        return dict(self.model_extra or {}, result=self.result)


Record = Union[ExperimentRecord, RunRecord, ListingRow]


def errors_text(e: ValidationError) -> str:
    """A pydantic error in one line: `loc: message; ...`."""
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) + (f"; ... ({e.error_count()} errors)" if e.error_count() > 5 else "")


def _no_constant(name: str):
    raise RecordError(f"{name} is not a JSON number (numbers must be finite)")


def parse_line(line: str | bytes) -> Record:
    """One JSON line as a record, or RecordError naming the field."""
    check_depth(line, "the line")
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:          # an integer too long for Python to read
        raise RecordError(f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    model = {"experiment": ExperimentRecord, "run": RunRecord}.get(kind)
    if model is None:
        if kind is not None:
            raise RecordError(f"unknown record type {kind!r} (experiment or run)")
        if "id" not in obj or "hypothesis" not in obj:
            raise RecordError("not an experiment, run or hypothesis row (needs 'type', or 'id' and 'hypothesis')")
        model = ListingRow
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RecordError(errors_text(e)) from None
