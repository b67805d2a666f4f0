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
from pydantic_core import PydanticCustomError

KINDS = ("codec", "transform", "solver")
#: packages whose modules define families (every module in them is imported by `load_families`)
FAMILY_PACKAGES = ("quantatlas.quant.codecs", "quantatlas.quant.transforms", "quantatlas.quant.solvers")

_REGISTRY: dict[str, dict[str, type[Config]]] = {k: {} for k in KINDS}
_loaded = False


class ConfigError(ValueError):
    """A config that does not validate: `loc` is the path inside the config (name first)."""

    def __init__(self, loc: tuple, message: str, value: Any = None, has_value: bool = False):
        self.loc, self.message, self.value, self.has_value = tuple(loc), message, value, has_value
        shown = f" (value: {value!r})" if has_value else ""
        super().__init__(f"{'.'.join(map(str, self.loc))}: {message}{shown}" if self.loc else f"{message}{shown}")


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
        return self.model_dump(mode="json", exclude_defaults=exclude_defaults)

    def to_spec(self, exclude_defaults: bool = False) -> dict[str, dict]:
        return {self.name: self.options(exclude_defaults)}


class CodecConfig(Config):
    kind = "codec"


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
