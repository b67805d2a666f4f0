"""Experiment specs: pydantic models of experiment, arm and recipe, loaded from YAML.

Errors name the file, the field (as a dotted path), its line and the offending value, so
`quantatlas run` can print one line and exit 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, ValidationInfo, field_validator,
                      model_serializer)

from quantatlas.quant.act import ActConfig
from quantatlas.quant.allocate import AllocateConfig
from quantatlas.quant.config import ConfigError, config_field, error_parts, parse_config, pydantic_error
from quantatlas.quant.kv import KVCacheConfig
from quantatlas.quant.recovery import RecoveryConfig


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


class ArtifactCap(_Strict):
    """A hard cap on the artifact file's bytes after compression (the parameter-golf track):
    arms whose artifact exceeds it are marked over the cap in tables and verdicts."""
    max_bytes: int = Field(gt=0)
    compressor: Literal["zstd-22", "brotli-11"] = "zstd-22"


def _known_solver(name: str | None) -> str | None:
    from quantatlas.quant.config import registry

    known = registry("solver")
    if name is not None and name not in known:
        raise ValueError(f"unknown solver {name!r}; known: {', '.join(sorted(known))}")
    return name


class Override(_Strict):
    match: str                                # a regex searched in the module name, or a role name (k, down, ...)
    codec: config_field("codec") = None       # null keeps the tensor in fp16
    solver: str | None = None

    _solver = field_validator("solver")(classmethod(lambda cls, v: _known_solver(v)))


class Arm(_Strict):
    solver: str = "rtn"
    solver_options: Annotated[Any, PlainSerializer(lambda v, info: v.options(bool(info.exclude_defaults)))] = \
        Field({}, validate_default=True)
    codec: config_field("codec") = None       # null: keep fp16 (the unquantized arm)
    transforms: list[config_field("transform", nullable=False)] = []
    overrides: list[Override] = []
    propagation: Literal["sequential", "parallel"] = "sequential"
    include_head: bool = False
    calib: CalibData | None = None  # this arm's calibration draw, instead of data.calib
    kv: KVCacheConfig | None = None
    act: ActConfig | None = None
    #: finetune recovery after the weights, the fp model as teacher (quant/recovery.py)
    recovery: RecoveryConfig | None = None
    #: null: inferred from the recipe (see `seeded`); true/false: the author says so
    deterministic: bool | None = None
    #: choose a codec per tensor group within a bit budget (quant/allocate.py, quant/sensitivity.py)
    allocate: AllocateConfig | None = None

    _solver = field_validator("solver")(classmethod(lambda cls, v: _known_solver(v)))

    @field_validator("allocate")
    @classmethod
    def _allocate_has_a_base(cls, v, info: ValidationInfo):
        if v is not None and "codec" in info.data and info.data["codec"] is None:
            raise ValueError("allocate needs the arm's codec: the base every group starts from")
        if v is not None and getattr(info.data.get("codec"), "name", None) == "gguf":
            raise ValueError("allocate works from one base codec, not a gguf mixture")
        return v

    @field_validator("solver_options", mode="before")
    @classmethod
    def _solver_options(cls, v, info: ValidationInfo):
        """The solver's typed config; errors keep the option's name (solver_options.damp)."""
        solver = info.data.get("solver")
        if solver is None:  # the solver itself did not validate; that error is reported
            return v
        if not isinstance(v, dict):
            raise ValueError(f"must be a mapping of {solver}'s options, got {v!r}")
        try:
            return parse_config("solver", {solver: v})
        except ConfigError as e:  # the path inside solver_options, without the solver's name
            raise pydantic_error(e, skip=1) from None

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        d = handler(self)
        if info.exclude_defaults and d.get("solver_options") == {}:  # the solver's defaults are not a choice
            d.pop("solver_options")
        return d

    @property
    def codec_name(self) -> str | None:
        return None if self.codec is None else self.codec.name

    @property
    def seeded(self) -> bool:
        """Whether this arm's results depend on the experiment seed (calibration draw, random
        rotation signs, k-means starts). `deterministic: true` in the spec says they do not."""
        if self.deterministic is not None:
            return not self.deterministic
        configs = [self.codec, self.solver_options, *self.transforms, self.kv, self.act, self.recovery]
        if self.allocate is not None and self.allocate.assignment is None:
            return True  # measured on a seed's calibration draw
        for o in self.overrides:
            configs.append(o.codec)
            if o.solver is not None:
                configs.append(parse_config("solver", o.solver))
        return any(c is not None and c.seeded for c in configs)


# Arm fields added after results were first stored: left out of an arm's identity while unset,
# so a new optional step does not orphan every stored result (runner.arm_key, Ledger.find_run).
LATER_ARM_FIELDS = ("recovery",)


def stable_arm_config(cfg: dict) -> dict:
    """An arm's dumped config as stored results are keyed by."""
    return {k: v for k, v in cfg.items() if not (k in LATER_ARM_FIELDS and v is None)}


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
    #: the arm that stands for the experiment in the list (default: the best treatment)
    primary: str | None = None
    criterion: Criterion = Criterion()
    artifact: ArtifactCap | None = None  # e.g. {max_bytes: 16000000, compressor: zstd-22}

    @field_validator("control", "primary")
    @classmethod
    def _control_is_an_arm(cls, v, info: ValidationInfo):
        arms = info.data.get("arms")
        if v is not None and arms is not None and v not in arms:
            raise ValueError(f"{info.field_name} {v!r} is not one of the arms ({', '.join(arms)})")
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


def parse_spec(data: Any, source: str = "<spec>", root: yaml.Node | None = None) -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a YAML mapping, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        loc, msg, value, has_value = error_parts(e.errors()[0])
        field = ".".join(str(x) for x in loc) or "(top level)"
        line = _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        shown = f" (value: {value!r})" if has_value and value is not None else ""
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
