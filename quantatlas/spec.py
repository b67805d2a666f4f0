"""Experiment specs: pydantic models of experiment, arm and recipe, loaded from YAML.

Errors name the file, the field (as a dotted path), its line and the offending value, so
`quantatlas run` can print one line and exit 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator


class SpecError(ValueError):
    """A user mistake in a spec; the message is one line naming file, field and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibData(_Strict):
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=2)
    source: str = "stdlib"


class EvalData(_Strict):
    tokens: int = Field(65536, ge=2)
    ctx: int = Field(512, ge=2)
    score: Literal["second_half", "all"] = "second_half"
    source: str = "stdlib"
    batch: int = Field(8, ge=1)


class Data(_Strict):
    calib: CalibData = CalibData()
    eval: EvalData = EvalData()


class Criterion(_Strict):
    metric: str = "kld_mean"
    better: Literal["lower", "higher"] = "lower"
    min_effect: float = Field(0.05, ge=0)
    alpha: float = Field(0.01, gt=0, lt=1)


def _named(value: Any, what: str) -> dict[str, dict] | None:
    """`name`, `{name: {opts}}` or null -> {name: opts}; one name only."""
    if value is None:
        return None
    if isinstance(value, str):
        return {value: {}}
    if isinstance(value, dict) and len(value) == 1:
        (name, opts), = value.items()
        if opts is None:
            opts = {}
        if name == "gguf" and isinstance(opts, str):  # {gguf: Q4_K_M} shorthand
            opts = {"ftype": opts}
        if not isinstance(opts, dict):
            raise ValueError(f"{what} {name!r} options must be a mapping, got {opts!r}")
        return {str(name): opts}
    raise ValueError(f"{what} must be a name or a mapping with one name, got {value!r}")


class Override(_Strict):
    match: str                       # a regex searched in the module name, or a role name (k, down, ...)
    codec: dict[str, dict] | None = None  # null keeps the tensor in fp16
    solver: str | None = None

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v):
        return _named(v, "codec")


class Arm(_Strict):
    solver: str = "rtn"
    solver_options: dict[str, Any] = {}
    codec: dict[str, dict] | None = None   # null: keep fp16 (the unquantized arm)
    transforms: list[dict[str, dict]] = []
    overrides: list[Override] = []
    propagation: Literal["sequential", "parallel"] = "sequential"
    include_head: bool = False
    calib: CalibData | None = None  # this arm's calibration draw, instead of data.calib
    kv: dict[str, Any] | None = None
    act: dict[str, Any] | None = None

    @field_validator("codec", mode="before")
    @classmethod
    def _codec(cls, v):
        return _named(v, "codec")

    @field_validator("transforms", mode="before")
    @classmethod
    def _transforms(cls, v):
        return [_named(t, "transform") for t in (v or [])]

    @property
    def codec_name(self) -> str | None:
        return None if self.codec is None else next(iter(self.codec))


class Spec(_Strict):
    title: str
    hypothesis: str = ""
    tags: list[str] = []
    notes: str | None = None
    model: str = "reference"
    data: Data = Data()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: dict[str, Arm] = Field(min_length=1)
    control: str | None = None  # after arms, so its validator sees them
    criterion: Criterion = Criterion()

    @field_validator("control")
    @classmethod
    def _control_is_an_arm(cls, v, info: ValidationInfo):
        arms = info.data.get("arms")
        if v is not None and arms is not None and v not in arms:
            raise ValueError(f"control {v!r} is not one of the arms ({', '.join(arms)})")
        return v

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """Hash of the normalised spec without its free text: the ledger's experiment identity."""
        from quantatlas.atlas.ids import normalise_spec, spec_hash

        return spec_hash(normalise_spec(self.to_dict())[1])[:16]


def _line_of(root: yaml.Node | None, path: tuple) -> int | None:
    """1-based line of the YAML node at `path` (or its deepest existing parent)."""
    node, line = root, None
    for key in path:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _value_at(data: Any, path: tuple) -> Any:
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def parse_spec(data: Any, source: str = "<spec>", root: yaml.Node | None = None) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        field = ".".join(str(x) for x in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        msg = err["msg"].removeprefix("Value error, ")
        value = _value_at(data, loc)
        shown = "" if value is None or err["type"] == "missing" else f" (value: {value!r})"
        raise SpecError(f"{where}: field {field}: {msg}{shown}") from None


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    text = path.read_text()
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    return parse_spec(data, str(path), root)


def field_line(path: str | Path, field: str) -> int | None:
    """Line of a dotted field path (e.g. `arms.int4.codec`) in a YAML spec file, if it can be found."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    keys = tuple(int(k) if k.isdigit() else k for k in field.split("."))
    return _line_of(root, keys)
