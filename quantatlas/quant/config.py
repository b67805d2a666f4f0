"""Typed technique configs: each codec, transform and solver is a pydantic class that registers
itself under (kind, name) when it is defined; `config.build()` makes the object.

In a spec a config is written `name` or `{name: {options}}`. Options are validated by the class
(types strict, ranges as declared), defaults filled in; `to_spec()` writes it back the same way.
A family is one file with its config class and its object; the files of the family packages
below are imported on first use, so nothing keeps a list of them.

This module and the family modules import without torch (they reach it through
`quantatlas._lazy`), so the atlas server validates specs with the same classes as `quantatlas run`.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from quantatlas.errors import UserError

KINDS = ("codec", "transform", "solver")
#: packages whose modules define families (every module in them is imported by `load_families`)
FAMILY_PACKAGES = ("quantatlas.quant.codecs", "quantatlas.quant.transforms", "quantatlas.quant.solvers")

_REGISTRY: dict[str, dict[str, type[Config]]] = {k: {} for k in KINDS}
_loaded = False


class ConfigError(UserError):
    """A config that does not validate: `loc` is the path inside the config (name first). Where the
    config sits in a spec is known only to the caller, which may give it as `field` (`arms.a.codec`)."""

    def __init__(self, loc: tuple, message: str, value: Any = None, has_value: bool = False,
                 field: str | None = None):
        self.loc, self.message, self.value, self.has_value = tuple(loc), message, value, has_value
        shown = f" (value: {value!r})" if has_value else ""
        super().__init__(f"{'.'.join(map(str, self.loc))}: {message}{shown}" if self.loc else f"{message}{shown}",
                         field)


class Config(BaseModel):
    """Base of every technique config. Subclasses set `kind` (via their family base) and `name`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    kind: ClassVar[str]
    name: ClassVar[str]
    #: whether the object's results depend on the experiment seed (random signs, k-means starts)
    seeded: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.kind][cls.name] = cls

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data):
        """4.0 is 4 (JSON and YAML writers differ); types stay strict otherwise (no "4", no true for 1)."""
        if isinstance(data, dict):
            return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in data.items()}
        return data

    def build(self):
        raise NotImplementedError(f"{type(self).__name__}.build")

    def options(self, exclude_defaults: bool = False) -> dict[str, Any]:
        """Every option; exclude_defaults: only those that differ from their first released default
        (`identity_dump`, what an experiment id records: hashed, never read back as a config). An
        option `added_later` is left out of both while at its default, so configs stored before it
        existed read the same; one whose default changed since (`first_default`) is always written
        out in full, so a stored config never depends on which default its reader has (configs
        stored before it existed are read with `fill_first_defaults`)."""
        if exclude_defaults:
            return identity_dump(self)
        later = [name for name, field in type(self).model_fields.items()
                 if _declared(field, ADDED_LATER, False) and _declared(field, FIRST_DEFAULT) is _UNDECLARED
                 and getattr(self, name) == identity_default(field)]
        return self.model_dump(mode="json", exclude=set(later) or None)

    def to_spec(self, exclude_defaults: bool = False) -> dict[str, dict]:
        return {self.name: self.options(exclude_defaults)}


#: json_schema_extra keys of a field whose default changed or that came later (see `identity_dump`):
#: {FIRST_DEFAULT: v}: the option's default when first released, v, is not its default now;
#: {ADDED_LATER: True}: the option came after results were stored; its (first) default is what they did
FIRST_DEFAULT = "first_default"
ADDED_LATER = "added_later"
_UNDECLARED = object()


def _declared(field: FieldInfo, key: str, absent: Any = _UNDECLARED) -> Any:
    extra = field.json_schema_extra
    return extra.get(key, absent) if isinstance(extra, dict) else absent


def identity_default(field: FieldInfo) -> Any:
    """The default an experiment id measures a field against: its first released default."""
    first = _declared(field, FIRST_DEFAULT)
    return field.get_default(call_default_factory=True) if first is _UNDECLARED else first


def _later_with_new_default(name: str) -> dict[str, Any]:
    """{option: first default} of the configs named `name` (any kind) for options `added_later`
    whose default has changed since (`first_default`)."""
    load_families()
    out = {}
    for kind in _REGISTRY.values():
        cls = kind.get(name)
        for option, field in (cls.model_fields.items() if cls is not None else ()):
            first = _declared(field, FIRST_DEFAULT)
            if _declared(field, ADDED_LATER, False) and first is not _UNDECLARED:
                out[option] = first
    return out


def _walk_configs(data: Any, visit) -> Any:
    """`data` (a stored spec, arm or config, as JSON) with `visit(name, options)` applied to every
    `{name: {options}}` whose name is a registered config; a new object, `data` is not changed."""
    if isinstance(data, list):
        return [_walk_configs(v, visit) for v in data]
    if not isinstance(data, dict):
        return data
    out = {k: _walk_configs(v, visit) for k, v in data.items()}
    if len(out) == 1:
        (name, opts), = out.items()
        if isinstance(opts, dict) and isinstance(name, str):
            out = {name: visit(name, opts)}
    return out


def fill_first_defaults(stored: Any) -> Any:
    """A stored config, spec or arm (JSON) as it was meant: an option added later whose default changed
    since is missing only from what was stored before it existed, which ran its first default."""
    def visit(name, opts):
        return {**{k: v for k, v in _later_with_new_default(name).items() if k not in opts}, **opts}
    return _walk_configs(stored, visit)


def drop_first_defaults_of_later(stored: Any) -> Any:
    """A stored config, spec or arm (JSON) without the options added later that sit at their first
    default: the form stored results are keyed by, the same whether it was stored before or after."""
    def visit(name, opts):
        later = _later_with_new_default(name)
        return {k: v for k, v in opts.items() if not (k in later and v == later[k])}
    return _walk_configs(stored, visit)


def identity_dump(model: BaseModel) -> dict[str, Any]:
    """model_dump(mode="json", exclude_defaults=True), except that every field (of the model and of
    the spec models nested in it) is measured against its first released default: so once a default
    changes, the bare spelling gets a new id and the old explicit spelling keeps its old one. Fields
    without a FIRST_DEFAULT declaration are measured against their default, as pydantic does (configs
    nested as fields apply this rule in their own serializer: `Config.options`)."""
    return _first_defaults(model, model.model_dump(mode="json", exclude_defaults=True))


def _first_defaults(model: BaseModel, dumped: dict) -> dict:
    for name, field in type(model).model_fields.items():
        value, first = getattr(model, name), _declared(field, FIRST_DEFAULT)
        if first is not _UNDECLARED:
            if value == first:
                dumped.pop(name, None)
                continue
            if name not in dumped:   # at the current default, which is not the first
                dumped[name] = (value.model_dump(mode="json", exclude_defaults=True) if isinstance(value, BaseModel)
                                else model.model_dump(mode="json", include={name})[name])
        if name in dumped:
            written = dumped[name] != {}
            _nested_first_defaults(value, dumped[name])
            if written and dumped[name] == {} and isinstance(identity_default(field), BaseModel):
                dumped.pop(name)   # a nested model that differed only by a changed default: at its first one
        elif isinstance(value, BaseModel) and not isinstance(value, Config):
            # left out at its default, yet a default inside it may have changed since its first release
            plain = value.model_dump(mode="json", exclude_defaults=True)
            inner = _first_defaults(value, value.model_dump(mode="json", exclude_defaults=True))
            if inner != plain and inner:
                dumped[name] = inner
    return dumped


def _nested_first_defaults(value: Any, dumped: Any) -> None:
    if isinstance(value, Config):
        return
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        _first_defaults(value, dumped)
    elif isinstance(value, (list, tuple)) and isinstance(dumped, list) and len(value) == len(dumped):
        for v, d in zip(value, dumped):
            _nested_first_defaults(v, d)
    elif isinstance(value, dict) and isinstance(dumped, dict):
        for k, v in value.items():
            if str(k) in dumped:
                _nested_first_defaults(v, dumped[str(k)])


class CodecConfig(Config):
    kind = "codec"
    #: whether GPTQ's act_order + static_groups defaults suit this codec when an arm writes neither
    #: (measured in experiments/gptq/defaults_codecs.yaml: they help scalar grids; lattices, whose
    #: group scales fitted up front cost more than the column order gains, set False)
    act_order_helps: ClassVar[bool] = True


class TransformConfig(Config):
    kind = "transform"


class SolverConfig(Config):
    kind = "solver"


def load_families() -> None:
    """Import every module of the family packages once, so each registers its configs."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in FAMILY_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            importlib.import_module(info.name)


def registry(kind: str) -> dict[str, type[Config]]:
    load_families()
    return _REGISTRY[kind]


def _split(value: Any, kind: str) -> tuple[str, Any]:
    """`name` or `{name: options}` -> (name, options)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and len(value) == 1:
        (name, options), = value.items()
        return str(name), {} if options is None else options
    raise ConfigError((), f"a {kind} is a name or a mapping with one name, got {value!r}")


def parse_config(kind: str, value: Any) -> Config:
    """A validated config from `name`, `{name: options}` or a config instance; raises ConfigError."""
    known = registry(kind)
    if isinstance(value, Config):
        if value.kind != kind:
            raise ConfigError((), f"expected a {kind} config, got a {value.kind} config ({value.name})")
        return value
    name, options = _split(value, kind)
    if name not in known:
        raise ConfigError((), f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
    cls = known[name]
    if isinstance(options, str) and hasattr(cls, "from_string"):
        options = cls.from_string(options)
    if not isinstance(options, dict):
        raise ConfigError((name,), f"options must be a mapping, got {options!r}")
    try:
        return cls.model_validate(options)
    except ValidationError as e:
        loc, msg, value, has_value = error_parts(e.errors()[0])
        raise ConfigError((name,) + loc, msg, value, has_value) from None


def error_parts(err: dict) -> tuple[tuple, str, Any, bool]:
    """(loc, message, value, whether the value is worth showing) of one pydantic error, with a nested
    config's own path (see `config_field`) appended to the loc."""
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
    if err["type"] == "config":
        ctx = err["ctx"]
        return loc + tuple(ctx["subloc"]), ctx["message"], ctx.get("value"), bool(ctx.get("has_value"))
    return loc, err["msg"].removeprefix("Value error, "), err.get("input"), err["type"] != "missing" and loc != ()


def pydantic_error(e: ConfigError, skip: int = 0) -> PydanticCustomError:
    """A ConfigError as a pydantic error that keeps its path (less the first `skip` parts) for `error_parts`."""
    return PydanticCustomError("config", "{message}", {"message": e.message, "subloc": e.loc[skip:],
                                                      "value": e.value, "has_value": e.has_value})


def config_field(kind: str, nullable: bool = True):
    """An annotated type for a field holding a `kind` config written as in a spec (name or {name: opts}).

    Validation errors keep the path inside the config (`codec.uniform.bits`) for the caller's
    message; the field serialises back to {name: options}, without defaults under exclude_defaults.
    """
    def validate(value):
        if value is None and nullable:
            return None
        try:
            return parse_config(kind, value)
        except ConfigError as e:
            raise pydantic_error(e) from None

    def serialize(value, info):
        return None if value is None else value.to_spec(exclude_defaults=bool(info.exclude_defaults))

    return Annotated[Any, BeforeValidator(validate), PlainSerializer(serialize)]


def build(kind: str, value: Any):
    """The object of a config written as in a spec; raises ValueError naming the field."""
    return parse_config(kind, value).build()


def arm_codecs(arm, where: str | None = "arm"):
    """(codec config, field) of every codec the arm can store a weight with: its codec, each override's,
    each allocation candidate's. Fields start with `where.` (None: bare, as an arm's own step names them)."""
    at = f"{where}." if where else ""
    if arm.codec is not None:
        yield arm.codec, f"{at}codec"
    for i, o in enumerate(arm.overrides):
        if o.codec is not None:
            yield o.codec, f"{at}overrides.{i}.codec"
    for j, c in enumerate(arm.allocate.candidates if arm.allocate is not None else []):
        yield c, f"{at}allocate.candidates.{j}"
