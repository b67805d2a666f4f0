"""The weight recipe: which solver and codec each tensor gets (the weights step of an arm's
pipeline, `quant/steps/weights.py`; the other steps are in `quant/steps/`).

The solvers say which statistics they need; the weight pass collects only those. Overrides pick
tensors by role name (k, down, q_norm, expert_down, router, ...) or by a regex searched in the module
name, in order, the last match winning; `codec: null` in an override keeps a tensor fp16. The arm's codec
applies to matrices; norm vectors, and an MoE block's routers (router, shared_router), are quantized only
where an override gives them a codec. A routed expert's matrices are named per expert,
`model.layers.<L>.mlp.experts.<E>.<gate_proj|up_proj|down_proj>` (a fused 3-D expert tensor too), so a
regex picks an expert index, a role and a layer: `layers[.]3[.].*experts[.]7[.]down_proj`.
An override whose match hits no tensor the arm plans is refused (`Recipe.check_overrides`): it would
change nothing, and the arm would silently be its control (`match: down` on a mixture of experts, whose
MLP roles are expert_down, ...).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from quantatlas.errors import UserError
from quantatlas.quant.codecs import Codec
from quantatlas.quant.codecs.gguf import GGUFConfig
from quantatlas.quant.config import parse_config
from quantatlas.quant.moe import MoEConfig
from quantatlas.quant.solvers.base import Solver

VECTOR_ROLES = ("norm", "q_norm", "k_norm")
#: matrices the arm's codec leaves in fp16 (models/layout.py ROUTER_ROLES): an MoE block's routers
KEPT_ROLES = ("router", "shared_router")



@dataclass
class TensorPlan:
    name: str           # module name
    role: str
    layer: int | None
    codec: Codec | None  # None: stays fp16
    solver: Solver
    target: Any = None  # the TensorRole

    @property
    def is_vector(self) -> bool:
        return self.role in VECTOR_ROLES


@dataclass
class Recipe:
    solver: Solver | None = None
    codec: Codec | None = None
    overrides: list[tuple[re.Pattern | str, Codec | None, Solver | None]] = field(default_factory=list)
    propagation: str = "sequential"
    include_head: bool = False
    mixture: Any = None  # a GGUFMixture: llama.cpp's per-tensor types instead of one codec
    moe: MoEConfig = field(default_factory=MoEConfig)  # how MoE experts are calibrated (quant/moe.py)
    where: str = "arm"  # the arm's spec path (`arms.<name>`): what a refused override's field starts with

    def __post_init__(self):
        if self.solver is None:
            self.solver = parse_config("solver", "rtn").build()

    def plan(self, roles, model=None) -> list[TensorPlan]:
        """Each of `roles` (every tensor the arm may quantize: quantize.tensors_to_quantize) with its codec and
        solver; an override that hits none of them is refused (UserError naming its match)."""
        self.check_overrides(roles, model)
        types = self.mixture.plan(model) if self.mixture is not None else {}
        plans = []
        for t in roles:
            vector = t.role in VECTOR_ROLES
            codec, solver = (None if vector or t.role in KEPT_ROLES else self.codec), self.solver
            if self.mixture is not None and not vector:
                codec = self.mixture.codec_of(types.get(t.name, "f16"))
            for match, o_codec, o_solver in self.overrides:
                if _hits(match, t):
                    codec, solver = o_codec, (o_solver or solver)
            plans.append(TensorPlan(t.name, t.role, t.layer, codec, solver, t))
        return plans

    def check_overrides(self, roles, model=None, name: str | None = None) -> None:
        """Refuse, naming `<where>.overrides.<i>.match`, its value and the model (`name`, default
        `model_label(model)`), the first override whose match hits none of `roles` (the tensors the arm plans
        on `model`); the message lists the model's roles, and tells a tensor this arm leaves unquantized (the
        head without include_head) from a name the model does not have."""
        from quantatlas.models.roles import find_roles

        for i, (match, _, _) in enumerate(self.overrides):
            if any(_hits(match, t) for t in roles):
                continue
            every = find_roles(model) if model is not None else roles   # read only on the way to refusing
            label = name or model_label(model)
            value = match if isinstance(match, str) else match.pattern
            field = f"{self.where}.overrides.{i}.match"
            roles_of_model = ", ".join(dict.fromkeys(t.role for t in every))
            outside = sorted({t.role for t in every if _hits(match, t)})
            if outside:   # the model has them, this arm does not quantize them
                why = (f"hits only {', '.join(outside)} of model {label!r}, which this arm does not quantize"
                       + (" (the head needs include_head: true)" if "head" in outside else ""))
            else:
                kind = "a role" if isinstance(match, str) else "a regex searched in the module names"
                why = f"({kind}) matches no tensor of model {label!r}, whose roles are {roles_of_model}"
            raise UserError(f"{field}: {value!r} {why}: the override would change nothing", field)

    def overridden(self, t) -> bool:
        """Whether an override names tensor `t` (a TensorRole)."""
        return any(_hits(match, t) for match, _, _ in self.overrides)

    @property
    def solvers(self) -> list[Solver]:
        return [self.solver] + [s for _, _, s in self.overrides if s is not None]

    @property
    def statistics(self) -> frozenset[str]:
        """What the weight step's solvers need from calibration (see solvers/base.py)."""
        out = frozenset().union(*(s.needs for s in self.solvers))
        if self.mixture is not None and self.mixture.imatrix:
            out |= {"sq_mean"}
        return out

    @property
    def needs_calibration(self) -> bool:
        return bool(self.statistics)


def model_label(model) -> str:
    """What a message calls a torch model: its hub name or folder, else its class."""
    if model is None:
        return "the model"
    name = getattr(getattr(model, "config", None), "name_or_path", "")
    return str(name) or type(model).__name__


def _hits(match: re.Pattern | str, t) -> bool:
    return (match == t.role) if isinstance(match, str) else bool(match.search(t.name))


def _match(pattern: str, where: str) -> re.Pattern | str:
    from quantatlas.models.roles import ROLES

    if pattern in ROLES:
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}.match: bad regex {pattern!r}: {e}", f"{where}.match") from None


def build_recipe(arm, where: str = "arm") -> Recipe:
    """The weight recipe of a validated arm (`spec.Arm`: typed configs); ValueErrors name the field."""
    solver = arm.solver_options.build()
    overrides = []
    for i, o in enumerate(arm.overrides):
        o_solver = None
        if o.solver is not None:
            o_solver = solver if o.solver == arm.solver else parse_config("solver", o.solver).build()
        overrides.append((_match(o.match, f"{where}.overrides.{i}"), None if o.codec is None else o.codec.build(),
                          o_solver))
    mixture = codec = None
    if isinstance(arm.codec, GGUFConfig):
        mixture = arm.codec.build()
    elif arm.codec is not None:
        codec = arm.codec.build()
    return Recipe(solver=solver, codec=codec, overrides=overrides, propagation=arm.propagation,
                  include_head=arm.include_head, mixture=mixture, moe=getattr(arm, "moe", None) or MoEConfig(),
                  where=where)
