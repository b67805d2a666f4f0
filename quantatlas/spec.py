"""Experiment specs: pydantic models of experiment, arm and recipe, loaded from YAML.

Errors name the file, the field (as a dotted path), its line and the offending value, so
`quantatlas run` can print one line and exit 2.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_serializer, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from quantatlas.canonical import canonical, canonical_json, sha256_hex
from quantatlas.errors import UserError
from quantatlas.quant.act import ActConfig
from quantatlas.quant.allocate import AllocateConfig
from quantatlas.quant.config import (ADDED_LATER, FIRST_DEFAULT, ConfigError, drop_first_defaults_of_later,
                                     config_field, error_parts, fill_first_defaults, identity_dump,
                                     parse_config, pydantic_error)
from quantatlas.quant.kv import KVCacheConfig
from quantatlas.quant.overrides import Override, known_solver
from quantatlas.quant.recovery import RecoveryConfig
from quantatlas.quant.steps import arm_seeded, later_fields, registry


#: the free text of a spec: not part of its identity
FREE_TEXT = ("title", "hypothesis", "tags", "notes")
#: the embedded byte-level models, by `model:` name (reference/model.py ZOO_NAME, which imports torch)
EMBEDDED_MODELS = ("reference", "reference-llama", "reference-moe")


class SpecError(UserError):
    """A user mistake in a spec; the message is one line naming file, line, field and value (it carries
    its own location, so the command line prints it as it is). `field` is the dotted path, when known."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: the most tokens a calibration draw may hold: its windows are held at once (and read through the model);
#: 2^27 is 32 768 windows of 4096, some hundred times what GPTQ's and AutoRound's recipes draw
MAX_CALIB_TOKENS = 2 ** 27
#: the most seeds one spec runs
MAX_SEEDS = 1000


class CalibData(_Strict):
    samples: int = Field(64, ge=1)
    seq_len: int = Field(512, ge=2)
    source: str = "stdlib"

    @model_validator(mode="after")
    def _fits(self):
        if self.samples * self.seq_len > MAX_CALIB_TOKENS:
            raise pydantic_error(ConfigError(
                ("samples",), f"{self.samples} windows of {self.seq_len} tokens are {self.samples * self.seq_len:,} "
                f"tokens, more than the {MAX_CALIB_TOKENS:,} a calibration draw may hold", self.samples, True))
        return self


class EvalData(_Strict):
    #: tokens of the eval stream cut into windows of ctx, not the tokens scored (second_half scores
    #: ctx - 1 - ctx // 2 of each window); more than the stream has is refused (load_spec, make_eval_set)
    tokens: int = Field(65536, ge=2)
    ctx: int = Field(512, ge=2)
    score: Literal["second_half", "all"] = "second_half"
    source: str = "stdlib"
    batch: int = Field(8, ge=1)


class Data(_Strict):
    calib: CalibData = CalibData()
    eval: EvalData = EvalData()


class Criterion(_Strict):
    """What the verdict judges (quantatlas.atlas.verdict): the metric, its direction, the smallest
    relative effect worth a success, and the test's alpha."""
    metric: str = "kld_mean"
    better: Literal["lower", "higher"] = "lower"
    min_effect: float = Field(0.05, ge=0)
    alpha: float = Field(0.01, gt=0, lt=1)

    @property
    def lower_is_better(self) -> bool:
        return self.better != "higher"


class ArtifactCap(_Strict):
    """A hard cap on the artifact file's bytes after compression (the parameter-golf track):
    arms whose artifact exceeds it are marked over the cap in tables and verdicts."""
    max_bytes: int = Field(gt=0)
    compressor: Literal["zstd-22", "brotli-11"] = "zstd-22"


class Arm(BaseModel):
    """An arm: its steps' configs under their YAML keys. The keys below are the built-in steps';
    a step registered elsewhere (quant/steps/base.py) adds its own key, validated by its `config`."""
    model_config = ConfigDict(extra="allow")
    solver: str = "rtn"
    solver_options: Annotated[Any, PlainSerializer(lambda v, info: v.options(bool(info.exclude_defaults)))] = \
        Field({}, validate_default=True)
    codec: config_field("codec") = None       # null: keep fp16 (the unquantized arm)
    transforms: list[config_field("transform", nullable=False)] = []
    overrides: list[Override] = []
    #: layer by default since issue 25 (no worse than sequential at 4, 3 and 2 bits, 27 % faster); first
    #: released sequential, which arms whose solvers propagate nothing (rtn) keep (`_defaults_of_the_recipe`)
    propagation: Literal["sequential", "layer", "parallel"] = Field("layer", json_schema_extra={
        FIRST_DEFAULT: "sequential"})
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
    #: a reference point: shown, never judged as a treatment nor standing for the experiment (an arm
    #: that quantizes nothing, fp16, is one without saying so: `quant.steps.is_reference`)
    reference: bool = Field(False, json_schema_extra={ADDED_LATER: True})

    _solver = field_validator("solver")(classmethod(lambda cls, v: known_solver(v)))

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

    @model_validator(mode="after")
    def _defaults_of_the_recipe(self):
        """Defaults that follow the rest of the arm, where the arm does not write them: `propagation` stays
        at its first default where no solver propagates (rtn: nothing changes, the id neither), and the
        solver's options follow the codec (`GPTQConfig.for_codec`)."""
        if "propagation" not in self.model_fields_set and not self._propagates():
            self.propagation = "sequential"
        for_codec = getattr(self.solver_options, "for_codec", None)
        if for_codec is not None and self.codec is not None:
            self.solver_options = for_codec(self.codec)
        return self

    def _propagates(self) -> bool:
        return any(s not in (None, "rtn") for s in [self.solver, *(o.solver for o in self.overrides)])

    @model_validator(mode="after")
    def _solver_takes_its_codecs(self):
        """A solver option that cannot run with a codec the solver is handed (act_order on a grouped
        codec without static_groups, a block_size the codec's blocks do not divide) is refused here,
        naming the option, not after other arms have run."""
        for solver_cfg, option_at, codec_cfg, codec_at in self._solver_codec_pairs():
            only = getattr(solver_cfg, "only_codec", None)         # a solver of one codec (aqlm)
            if only is not None and codec_cfg.name != only:
                at = ("solver",) if option_at == ("solver_options",) else option_at
                hint = ("give that override a solver of its own, e.g. solver: gptq" if codec_at.startswith("overrides")
                        else f"use solver: gptq or rtn for {codec_cfg.name}")
                raise pydantic_error(ConfigError(at, f"solver {solver_cfg.name} quantizes with the {only} codec only; "
                                                     f"{codec_at} is {codec_cfg.name} ({hint})"))
            check = getattr(solver_cfg, "codec_conflict", None)   # solvers with such rules define it
            codec = None if check is None else _solver_codec(codec_cfg)
            conflict = None if codec is None else check(codec)
            if conflict is not None:
                option, why = conflict
                if codec_at != "codec":
                    why += f" (the codec at {codec_at})"
                if option_at == ("solver_options",):
                    raise pydantic_error(ConfigError((*option_at, option), why))
                raise pydantic_error(ConfigError(option_at, f"{solver_cfg.name} runs with its default options: {why}"))
        return self

    def _solver_codec_pairs(self):
        """(solver config, where its options are, codec config, where the codec is) for every codec a
        solver of this arm is handed: the arm's codec, each override's, each allocation candidate's."""
        if self.codec is not None:
            yield self.solver_options, ("solver_options",), self.codec, "codec"
        for i, o in enumerate(self.overrides):
            if o.codec is None:
                continue
            if o.solver is None or o.solver == self.solver:
                yield self.solver_options, ("solver_options",), o.codec, f"overrides.{i}.codec"
            else:   # an override's own solver runs with its defaults
                yield parse_config("solver", o.solver), ("overrides", i, "solver"), o.codec, f"overrides.{i}.codec"
        for j, c in enumerate(self.allocate.candidates if self.allocate is not None else []):
            yield self.solver_options, ("solver_options",), c, f"allocate.candidates.{j}"

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        d = handler(self)
        if info.exclude_defaults and d.get("solver_options") == {}:  # the solver's defaults are not a choice
            d.pop("solver_options")
        if info.exclude_defaults and not self._propagates() and d.get("propagation") == "sequential":
            d.pop("propagation")   # what an arm that propagates nothing gets by default (`_defaults_of_the_recipe`)
        for name, default in added_later_defaults().items():   # as `Config.options`: stored specs read the same
            if name in d and d[name] == default:                # (and an older atlas still parses them)
                d.pop(name)
        steps = registry()
        for key, value in (self.__pydantic_extra__ or {}).items():  # registered steps' configs, as written
            d[key] = TypeAdapter(steps[key].config).dump_python(value, mode="json",
                                                                exclude_defaults=bool(info.exclude_defaults))
        return d

    @property
    def codec_name(self) -> str | None:
        return None if self.codec is None else self.codec.name

    @property
    def seeded(self) -> bool:
        """Whether this arm's results depend on the experiment seed (calibration draw, random
        rotation signs, k-means starts): what its steps say, unless `deterministic:` says otherwise."""
        return arm_seeded(self)

    @model_validator(mode="wrap")
    @classmethod
    def _step_fields(cls, data, handler):
        """Keys the Arm does not declare: a registered step's config (validated by it), else refused."""
        if not isinstance(data, dict):
            return handler(data)
        steps = registry()
        extra = {k: v for k, v in data.items() if k not in cls.model_fields}
        errors, parsed = [], {}
        for key, value in extra.items():
            step = steps.get(key)
            if step is None or step.config is None:
                errors.append(InitErrorDetails(type="extra_forbidden", loc=(key,), input=value))
                continue
            try:
                parsed[key] = TypeAdapter(step.config).validate_python(value)
            except ValidationError as e:
                errors.extend(InitErrorDetails(type=PydanticCustomError(err["type"], err["msg"]),
                                               loc=(key, *err["loc"]), input=err["input"]) for err in e.errors())
        arm = handler({k: v for k, v in data.items() if k not in extra})   # the declared fields' errors first
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        arm.__pydantic_extra__.update(parsed)
        # a step that cannot stand beside the arm's other keys (an artifact with a codec; recovery: roste with
        # a static activation scale), whether its key is a registered step's or one the Arm declares
        declared = [k for k in steps if k in cls.model_fields and getattr(arm, k, None) not in (None, [])]
        for key in [*parsed, *declared]:
            why = steps[key](arm).conflicts()
            if why:
                raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                    type=PydanticCustomError("step_conflict", why.replace("{", "(").replace("}", ")")), loc=(key,),
                    input=extra[key] if key in extra else data.get(key))])
        return arm


@lru_cache(maxsize=256)
def _solver_codec(codec_cfg) -> SimpleNamespace | None:
    """What a solver sees of the codec it gets for `codec_cfg`: its name, block width and group size,
    read from the codec built (a gguf mixture: its file type's default ggml type), kept without the
    codec's tables. None where it cannot be built here: a codec whose construction needs torch, on the
    atlas server, which has none (the solver checks again at run time)."""
    from quantatlas.quant.codecs.gguf import GGUFConfig

    try:
        built = codec_cfg.build()
    except ImportError:
        return None
    if isinstance(codec_cfg, GGUFConfig):
        built = built.codec_of(built.default_type)
    return SimpleNamespace(name=built.name, block_width=built.block_width, group_size=built.group_size)


def arm_of(config: dict | None) -> Arm | None:
    """A stored arm config (the validated spec's arm, as JSON) as a typed Arm; None when it is not a
    mapping or no longer validates. Parsed once per distinct config."""
    if not isinstance(config, dict):
        return None
    try:
        return _arm_from_json(canonical_json(config))
    except (ValueError, TypeError):
        return None


@lru_cache(maxsize=4096)
def _arm_from_json(blob: str) -> Arm | None:
    import json

    try:
        return Arm.model_validate(fill_first_defaults(json.loads(blob)))
    except ValidationError:
        return None


def runnable_arm(arm: Arm) -> dict:
    """`arm` as a spec writes it: without its defaults where that reads back as the same arm, else in
    full (the id's short form leaves out first defaults, which a changed default would misread)."""
    short = arm.model_dump(mode="json", exclude_defaults=True)
    try:
        if Arm.model_validate(short).model_dump(mode="json") == arm.model_dump(mode="json"):
            return short
    except ValidationError:
        pass
    return arm.model_dump(mode="json")


def stable_arm_config(cfg: dict) -> dict:
    """An arm's dumped config as stored results are keyed by: the fields of steps added after results
    were first stored are left out while unset, so a new optional step does not orphan every stored
    result (runner.arm_key, Ledger.find_run); so are declared fields marked `added_later` while at their
    default (`reference: false`)."""
    later, added = later_fields(), added_later_defaults()
    cfg = drop_first_defaults_of_later(cfg)   # e.g. uniform's scale: absmax, stored before the option existed
    kept = {k: v for k, v in cfg.items() if not (k in later and v is None) and not (k in added and v == added[k])}
    return step_identities(kept)


def step_identities(arm_cfg: dict) -> dict:
    """An arm's dumped config with each registered step's config as far as it identifies the arm
    (`Step.identity`: an artifact arm is its tensors' hash, not its path)."""
    steps = registry()
    return {k: steps[k].identity(v) if k in steps and v is not None else v for k, v in arm_cfg.items()}


@lru_cache(maxsize=1)
def added_later_defaults() -> dict[str, Any]:
    """Declared Arm fields added after results were first stored (`json_schema_extra={ADDED_LATER: True}`),
    with the default that does what was done before they existed."""
    return {name: f.get_default(call_default_factory=True) for name, f in Arm.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(ADDED_LATER)}


class Spec(_Strict):
    title: str
    hypothesis: str = ""
    tags: list[str] = []
    notes: str | None = None
    model: str = "reference"
    #: a study: the same spec on several models instead of `model:`, run as one experiment per model, each
    #: exactly the spec with `model: <name>` (`for_model`: its own id, verdicts and reproductions); the study
    #: is their family (atlas/ids.py family_hash). Left out of every dump while unset, so no id changes
    models: list[str] | None = Field(None, exclude_if=lambda v: v is None)
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

    @field_validator("seeds")
    @classmethod
    def _seeds_are_distinct_and_in_range(cls, v):
        bad = [s for s in v if not 0 <= s < 2 ** 32]
        if bad:
            raise ValueError(f"a seed must be an integer from 0 to 2^32 - 1, got {bad[0]}")
        twice = sorted({s for s in v if v.count(s) > 1})
        if twice:
            raise ValueError(f"seed {twice[0]} named more than once in {v}: each seed runs once")
        if len(v) > MAX_SEEDS:
            raise ValueError(f"{len(v)} seeds, more than {MAX_SEEDS}")
        return v

    @field_validator("models")
    @classmethod
    def _models_are_distinct_names(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list names no model: write at least one, or `model:` for one")
        for name in v:
            if not name.strip():
                raise ValueError(f"an empty model name in {v!r}")
        twice = sorted({name for name in v if v.count(name) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} named more than once in {v!r}: each model runs once")
        return v

    @model_validator(mode="after")
    def _calibration_holds_the_windows_asked(self):
        """A transform that trains on calibration windows (spinquant's `samples` of `seq_len`) takes them from
        the arm's draw (its `calib:`, else `data.calib`): asking for more is refused here, not after the
        reference logits and the other arms."""
        for name, arm in self.arms.items():
            draw = arm.calib or self.data.calib
            for i, t in enumerate(arm.transforms):
                for option, have in (("samples", draw.samples), ("seq_len", draw.seq_len)):
                    asked = getattr(t, option, None)
                    if asked is not None and asked > have:
                        source = f"arms.{name}.calib" if arm.calib else "data.calib"
                        raise pydantic_error(ConfigError(
                            ("arms", name, "transforms", i, t.name, option),
                            f"{asked} asked, more than the {have} of the arm's calibration draw ({source}.{option})",
                            asked, True))
        return self

    @model_validator(mode="after")
    def _model_or_models(self):
        if self.models is not None and "model" in self.model_fields_set:
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("model_and_models", "give either `model:` (one model) or `models:` (a "
                                                             "study of several), not both; model: {model}",
                                         {"model": repr(self.model)}), loc=("models",), input=self.models)])
        return self

    @property
    def is_study(self) -> bool:
        """Whether the spec names several models (`models:`): run and registered per model (`for_model`)."""
        return self.models is not None

    def model_names(self) -> list[str]:
        """The models the spec runs on: `models:`, else `[model]`."""
        return list(self.models) if self.models is not None else [self.model]

    def one_model(self, what: str) -> str:
        """`model:`, for a command that works on one model (`what`); a study is refused (UserError naming models)."""
        if self.models is not None:
            raise UserError(f"{what} works on one model and this spec is a study of {len(self.models)} "
                            f"({', '.join(self.models)}): write `model: <name>` instead of `models:`", "models")
        return self.model

    def for_model(self, name: str) -> Spec:
        """The spec with `model: <name>` in place of `models:`: the experiment it is on that model, with the
        id, verdicts and reproductions that spelling has."""
        if self.models is not None and name not in self.models:
            raise UserError(f"model {name!r} is not one of the spec's models ({', '.join(self.models)})", "models")
        return self.model_copy(update={"model": name, "models": None})

    def to_dict(self) -> dict:
        """The validated spec as JSON; a study's without `model:` (it names `models:`), so it parses back."""
        d = self.model_dump(mode="json")
        if self.models is not None:
            d.pop("model", None)
        return d

    def identity(self) -> dict:
        """What identifies the experiment (atlas/ids.py): the spec without its free text, every option
        at its first released default left out (`quant.config.identity_dump`), canonical."""
        identity = identity_dump(self)
        for key in FREE_TEXT:
            identity.pop(key, None)
        identity["arms"] = {name: step_identities(arm) for name, arm in identity["arms"].items()}
        return canonical(identity)

    def spec_hash(self) -> str:
        """Hash of the normalised spec without its free text: the ledger's experiment identity."""
        return sha256_hex(canonical_json(self.identity()))[:16]


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
        raise SpecError(f"{where}: field {field}: {msg}{shown}", field if loc else None) from None


def parse_stored_spec(data: Any, source: str = "<spec>") -> Spec:
    """A spec as quantatlas stored it (`Spec.to_dict()`, a ledger's or a pushed record's spec): options
    added later whose default changed since read as what was run when it was stored (`fill_first_defaults`)."""
    return parse_spec(fill_first_defaults(data), source)


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
    _refuse_duplicate_keys(root, str(path))
    spec = parse_spec(data, str(path), root)
    check_models(spec, str(path), root)
    _refuse_missing_data(spec, str(path), root)
    _refuse_eval_beyond_data(spec, str(path), root)
    try:
        return resolve_inputs(spec, path.parent)
    except UserError as e:
        raise SpecError(_located(str(path), root, e), e.field) from None


def _located(source: str, root: yaml.Node | None, e: UserError) -> str:
    """A UserError about a spec field as the one line a SpecError prints (file:line: field ...: message)."""
    if not e.field:
        return f"{source}: {e}"
    line = _line_of(root, tuple(int(k) if k.isdigit() else k for k in e.field.split(".")))
    msg = str(e)
    return f"{source}:{line}: field " + (msg if msg.startswith(e.field + ":") else f"{e.field}: {msg}")


def resolve_inputs(spec: Spec, base: Path | None, require: bool = False) -> Spec:
    """`spec` with each arm's steps' own inputs resolved (`Step.resolve`: an artifact's path made absolute,
    a relative one read from `base`, the spec file's folder; its content hash and provenance read from
    it). `require` (a spec about to run): an input that is not there is refused (UserError naming the
    field); otherwise it is left unread, to be refused when the spec runs."""
    steps = registry()
    arms = {}
    for name, arm in spec.arms.items():
        updates = {}
        for key in (arm.__pydantic_extra__ or {}):
            if key in steps:
                resolved = steps[key](arm, f"arms.{name}").resolve(base, require)
                if resolved is not None and resolved != arm.__pydantic_extra__[key]:
                    updates[key] = resolved
        if updates:
            arm = arm.model_copy(deep=True)
            arm.__pydantic_extra__.update(updates)
        arms[name] = arm
    return spec if all(arms[n] is spec.arms[n] for n in arms) else spec.model_copy(update={"arms": arms})


def _refuse_duplicate_keys(root: yaml.Node | None, source: str) -> None:
    """A key written twice in one mapping, anywhere in the file: YAML keeps the last without a word
    (an arm declared twice ran as its second declaration), so a spec may not have one."""
    todo, seen_nodes = [(root, ())], set()
    while todo:
        node, path = todo.pop()
        if node is None or id(node) in seen_nodes:   # an alias is its anchor's node, checked once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend((v, (*path, i)) for i, v in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":   # `<<:` may repeat keys
                    line = k.start_mark.line + 1
                    if (k.tag, k.value) in first:
                        field = ".".join(str(x) for x in (*path, k.value))
                        raise SpecError(f"{source}:{line}: field {field}: duplicate key {k.value!r} (first on line "
                                        f"{first[k.tag, k.value]}); YAML would keep only the last", field)
                    first[k.tag, k.value] = line
                    todo.append((v, (*path, k.value)))
                else:
                    todo.append((v, path))


def model_source_problem(name: str) -> str | None:
    """Why `name` cannot be a model source, as models/load.py reads one (an embedded model, a local folder, or a
    hub id `hf:org/name` / `org/name`), or None. The folder's contents and the hub are checked when it loads."""
    if name in EMBEDDED_MODELS or Path(name).is_dir():
        return None
    repo = name[3:] if name.startswith("hf:") else name
    if "/" in repo and not name.startswith((".", "/")) and all(repo.split("/")):
        return None
    return (f"{name!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), not a local folder (from "
            f"{Path.cwd()}), and not a hub id like hf:org/name")


def check_models(spec: Spec, source: str = "spec", root: yaml.Node | None = None) -> None:
    """Refuse a study (`models:`) naming a model that cannot load (SpecError naming `models.<i>` and the
    name), before any of its models runs. A one-model spec's `model:` is checked when it loads, as before."""
    for i, name in enumerate(spec.models or ()):
        why = model_source_problem(name)
        if why is not None:
            line = _line_of(root, ("models", i))
            where = f"{source}:{line}" if line else source
            raise SpecError(f"{where}: field models.{i}: {why}", f"models.{i}")


def _is_path_source(source: str) -> bool:
    """Whether a data source names a local text file (models/load.py: LoadedModel.text_tokens reads
    `stdlib` / `reference` from the package and `hf:org/name` from the hub)."""
    return source not in ("stdlib", "reference") and not source.startswith("hf:")


def _refuse_missing_data(spec: Spec, source: str, root: yaml.Node | None) -> None:
    """An eval or calibration file that is not there, refused before any model is loaded. Only for a
    spec file about to run: a stored spec names files on the machine that ran it."""
    for split in ("eval", "calib"):
        data = getattr(spec.data, split).source
        if _is_path_source(data) and not Path(data).is_file():
            loc = ("data", split, "source")
            field = ".".join(loc)
            what = "not a file" if Path(data).exists() else "no such file"
            raise SpecError(f"{source}:{_line_of(root, loc)}: field {field}: {what}: {data!r} (a relative path is "
                            f"read from the working directory, {Path.cwd()}; other sources: stdlib, "
                            "hf:org/name[:config])", field)


def _refuse_eval_beyond_data(spec: Spec, source: str, root: yaml.Node | None) -> None:
    """`data.eval.tokens` counts the eval stream's tokens cut into windows of ctx (not the scored ones:
    with second_half each window scores ctx - 1 - ctx // 2). On the byte-level reference model the
    shipped stream's length is known without loading anything, so asking for more is refused here;
    other streams are counted once tokenized (eval/windows.py: make_eval_set)."""
    ev = spec.data.eval
    if not set(spec.model_names()) & set(EMBEDDED_MODELS) or ev.source not in ("stdlib", "reference"):
        return   # (the embedded byte-level models, reference/model.py ZOO_ARCH: that module imports torch)
    from quantatlas.reference.data import token_count

    have = token_count("eval")
    if ev.tokens > have:
        most = have // ev.ctx
        scored = most * (ev.ctx - 1 - (ev.ctx // 2 if ev.score == "second_half" else 0))
        loc = ("data", "eval", "tokens")
        raise SpecError(f"{source}:{_line_of(root, loc)}: field data.eval.tokens: {ev.tokens} tokens asked, but the "
                        f"reference eval stream has {have} (at most {most} windows of ctx {ev.ctx}, {scored} tokens "
                        f"scored with score: {ev.score}); ask for at most {have}", "data.eval.tokens")


def field_line(path: str | Path, field: str) -> int | None:
    """Line of a dotted field path (e.g. `arms.int4.codec`) in a YAML spec file, if it can be found."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    keys = tuple(int(k) if k.isdigit() else k for k in field.split("."))
    return _line_of(root, keys)
