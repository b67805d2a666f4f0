"""A step of an arm's pipeline: one kind of thing an arm does to a model (llm-compressor's
modifiers are the model). Each kind is one file in this package (or anywhere that imports this
module): a `Step` subclass naming the arm's YAML key (`field`) it reads, with

    reads_calibration()   whether it reads the calibration stream (data.calib or the arm's calib)
    seeded()              whether its result depends on the run seed (a calibration draw, random signs)
    needs_whole_model()   why a layer-streamed model cannot run it (None: it can)
    check_model(lm)       refuse what it cannot do with the loaded model, before any arm runs
    conflicts()           why it cannot stand beside the arm's other keys (the spec refuses the arm)
    identity(dumped)      what of its config identifies the arm (default: all; not an input's path)
    resolve(base, ...)    its config with its own inputs resolved (paths, content hashes), if it has any
    quantizes()           whether it changes the model's numbers (an arm with none is a reference arm)
    techniques()          what it contributes to the atlas's composition view and left-to-try ("kv",
                          "transform:awq", ...; option labels from its typed config: `option_techniques`)
    apply(state, ctx)     do it (quant/pipeline.py calls the active steps in `order`)

A step whose `field` the spec's Arm does not declare brings its typed config as `config` (a pydantic
type); the Arm then accepts that key, validated by it (quantatlas/spec.py). This module imports no
torch, so the spec and the atlas read steps without it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

_STEPS: dict[str, type["Step"]] = {}
_loaded = False


class Step:
    field: ClassVar[str]
    #: position in the pipeline (allocate 10, transforms 20, weights 30, recovery 40, kv 50, act 60)
    order: ClassVar[int]
    #: the typed config of a field the Arm does not declare (a pydantic model or type); None otherwise
    config: ClassVar[Any] = None
    #: False: the field came after results were first stored, so it is left out of a stored run's key
    #: while unset (runner.arm_key); every step added from now on is such a field
    in_first_release: ClassVar[bool] = False
    #: whether the step needs the fp model as it is just before the weights change (recovery's teacher)
    wants_fp_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "field" in cls.__dict__:
            _STEPS[cls.field] = cls

    def __init__(self, arm, where: str = "arm"):
        self.arm, self.where = arm, where
        self.value = getattr(arm, self.field, None)

    @property
    def active(self) -> bool:
        return self.value is not None and self.value != []

    def reads_calibration(self) -> bool:
        return False

    def seeded(self) -> bool:
        return self.reads_calibration()

    def needs_whole_model(self) -> str | None:
        return None

    def quantizes(self) -> bool:
        return False

    def techniques(self) -> set[str]:
        return {self.field} | option_techniques(self.value, self.field)

    def apply(self, state, ctx) -> None:
        raise NotImplementedError

    def conflicts(self) -> str | None:
        """Why this step cannot stand in this arm beside its other keys (the spec refuses the arm), or None."""
        return None

    @classmethod
    def identity(cls, dumped):
        """The part of the step's dumped config that identifies what the arm computes (experiment ids, arm
        keys); all of it unless the config also says where its input lies (an artifact's path)."""
        return dumped

    def resolve(self, base, require: bool):
        """The step's config with its inputs resolved (a relative path read from `base`, the spec file's
        folder; what is read from the input filled in), or None when it reads nothing of its own.
        `require`: refuse, with a UserError naming the field, an input that is not there."""
        return None

    def check_model(self, lm) -> None:
        """Refuse, with a UserError naming the field, what this step cannot do with the loaded model
        (checked for every arm before any arm runs)."""


def option_techniques(config: Any, scope: str | None, fields: tuple[str, ...] | None = None) -> set[str]:
    """The options of a typed config (a pydantic model) that differ from their first released defaults
    (what experiment ids measure against, `quant.config.identity_default`: a label never changes when a
    default does), as technique labels `<scope>.<option>` (scope None: the bare option). Only choices
    a researcher names are techniques; settings are not:

        a switch (bool) turned on / off        solver.incoherence, codec.no_symmetric
        a choice (str, a nested config)        codec.clip=mse, kv.placement=pre_rope, kv.k=q4_0
        a list of choices                      act.roles=k+q+v (sorted; empty: =none)
        a mechanism a count or list turns on   kv.residual, kv.sinks, act.layers (default 0 / None / [])
        a default that is dropped (None)       codec.group=none

    Not techniques: required fields (the config's own name says them: bits, method, ftype), numbers
    away from a non-zero default (block_size, damp, group sizes, steps: settings), seeds, nested
    mappings (allocation targets, assignments). `fields` limits the options looked at."""
    from pydantic import BaseModel

    from quantatlas.quant.config import Config, identity_default

    if not isinstance(config, BaseModel):
        return set()
    out = set()
    for name, info in type(config).model_fields.items():
        if (fields is not None and name not in fields) or info.is_required() or name == "seed" \
                or name.endswith("_seed"):
            continue
        value, default = getattr(config, name), identity_default(info)
        if value == default:
            continue
        label = name if scope is None else f"{scope}.{name}"
        if isinstance(value, Config):
            out.add(f"{label}={value.name}")
        elif value is None:
            out.add(f"{label}=none")
        elif isinstance(value, bool):
            out.add(label if value else (f"{scope}.no_{name}" if scope else f"no_{name}"))
        elif isinstance(value, str):
            out.add(f"{label}={value}")
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, str) for v in value):
                out.add(f"{label}={'+'.join(sorted(value)) or 'none'}")
            elif not default:
                out.add(label)
        elif isinstance(value, (int, float)) and not default:
            out.add(label)
    return out


class RuntimeStep(Step):
    """A step that acts in every later forward pass (KV cache, activations): it always changes the
    model's numbers, and depends on the seed where its config has random parts (rotation signs)."""

    def seeded(self) -> bool:
        return self.value.seeded

    def quantizes(self) -> bool:
        return True


def registry() -> dict[str, type[Step]]:
    """Field -> step class, the built-in steps of this package loaded on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        pkg = importlib.import_module("quantatlas.quant.steps")
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"quantatlas.quant.steps.{mod.name}")
    return dict(_STEPS)


def steps_of(arm, where: str = "arm", active: bool = True) -> list[Step]:
    """The arm's steps in pipeline order (only those it uses, unless `active=False`)."""
    out = [cls(arm, where) for cls in sorted(registry().values(), key=lambda c: c.order)]
    return [s for s in out if s.active] if active else out


def arm_seeded(arm) -> bool:
    """THE answer to "does this arm's result depend on the seed?". `deterministic:` in the spec
    overrides what the steps say."""
    if getattr(arm, "deterministic", None) is not None:
        return not arm.deterministic
    return any(s.seeded() for s in steps_of(arm))


def arm_reads_calibration(arm) -> bool:
    return any(s.reads_calibration() for s in steps_of(arm))


def is_reference(arm) -> bool:
    """A reference point: an arm the spec marks `reference: true`, or one none of whose steps changes
    the model's numbers (fp16)."""
    return bool(getattr(arm, "reference", False)) or not any(s.quantizes() for s in steps_of(arm))


def arm_techniques(arm) -> frozenset[str]:
    return frozenset(t for s in steps_of(arm) for t in s.techniques())


def later_fields() -> tuple[str, ...]:
    """Arm fields added after results were first stored (left out of a stored run's key while unset)."""
    return tuple(f for f, cls in registry().items() if not cls.in_first_release)
